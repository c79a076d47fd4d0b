//! Stable Diffusion bundles. `trt-diff build MODEL --arch sd15|sd21|sdxl|sdxl-refiner|sdxl-turbo|sd-turbo
//! --precision P --out NAME.plan` takes a diffusers folder (unet/, vae/, text_encoder/, text_encoder_2/,
//! tokenizer/, tokenizer_2/, scheduler/) or a single-file CompVis/SGM checkpoint (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.N.*`; the CLIP vocabulary then comes from
//! `--clip-tokenizer`), exports every component to `NAME.<component>.onnx`, builds one engine each (the UNet's is
//! `NAME.plan`) with dynamic batch/size/prompt-length profiles from the recipe (engines/<arch>.toml), and records
//! the pipeline in the manifest. Without `--arch`, the arch is read off the files (Turbo models look like their
//! bases: name them).
use super::auto_precision::{self, AutoOptions};
use super::bundle::{ComponentGraphs, build_bundle, file_name, sibling};
use super::engines::{OpenOptions, open_file};
use super::image::ImagePipeline;
use super::sd::{SdEngines, SdModel, SdPipelineConfig, SdPrediction};
use crate::backend::BackendChoice;
use crate::manifest::{EngineFile, ImageBundle, ShapeRange};
use crate::models::clip::{self, ClipOptions, ClipTextConfig};
use crate::models::{taesd, unet, vae};
use crate::onnx::{DataType, SaveOptions, save};
use crate::quant::auto::{Format, LinearShape};
use crate::quant::{LinearPrecision, Precision};
use crate::tokenizer::clip::ClipTokenizer;
use crate::trt::{BuildOptions, BuildOutcome};
use crate::weights::lora::{LoraFile, LoraSpec, Part, Resolved, open_all};
use crate::weights::safetensors_file::Checkpoint;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize)]
pub struct Recipe {
    pub arch: String,
    pub defaults: RecipeDefaults,
    pub shapes: RecipeShapes,
    pub precision: RecipePrecision,
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeDefaults {
    pub steps: usize,
    pub cfg: f32,
    pub sampler: String,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeShapes {
    /// UNet batch (min, opt, max): with CFG two rows per image (conditional and unconditional in one run, when
    /// the prompts have the same number of chunks).
    pub batch: [i64; 3],
    /// Image side in pixels (min, opt, max), multiples of 8.
    pub image_px: [i64; 3],
    /// Prompt length in 77-token chunks (min, opt, max).
    pub prompt_chunks: [i64; 3],
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipePrecision {
    pub text_encoders: String,
    pub vae: String,
    pub keep: Vec<String>,
    pub calibration_steps: usize,
    pub calibration_px: usize,
    pub calibration_prompts: Vec<String>,
    /// `--precision auto` checks its choice on these (never on the calibration prompts).
    #[serde(default)]
    pub heldout_prompts: Vec<String>,
    /// INT8: SmoothQuant's migration strength alpha in [0, 1] (0: no smoothing).
    #[serde(default = "default_smoothquant_alpha")]
    pub smoothquant_alpha: f32,
}

fn default_smoothquant_alpha() -> f32 {
    0.5
}

/// Where each component comes from: a diffusers folder's subfolders, or one single file (with key scopes).
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub unet: PathBuf,
    pub vae: PathBuf,
    /// (checkpoint, key scope) per text encoder, in the pipeline's order.
    pub text_encoders: Vec<(PathBuf, String)>,
    /// One vocabulary per text encoder.
    pub tokenizers: Vec<PathBuf>,
    /// diffusers `scheduler/scheduler_config.json`, when there is one.
    pub scheduler_config: Option<PathBuf>,
    pub single_file: bool,
}

/// The SD arch a checkpoint's files say (Turbo distillations cannot be told from their bases).
pub fn detect_arch(model: &Path) -> Result<&'static str> {
    if model.is_dir() {
        let te = model.join("text_encoder").is_dir();
        let te2 = model.join("text_encoder_2").is_dir();
        return Ok(match (te, te2) {
            (true, true) => "sdxl",
            (false, true) => "sdxl-refiner",
            (true, false) => {
                let cfg =
                    ClipTextConfig::from_json(&read(&model.join("text_encoder/config.json"))?)?;
                if cfg.hidden_size == 1024 {
                    "sd21"
                } else {
                    "sd15"
                }
            }
            (false, false) => bail!(
                "'{}' has no text_encoder/ nor text_encoder_2/: not a diffusers Stable Diffusion folder",
                model.display()
            ),
        });
    }
    let ck = Checkpoint::open(model)?;
    let has = |p: &str| ck.names().any(|k| k.starts_with(p));
    Ok(if has("conditioner.embedders.1.") {
        "sdxl"
    } else if has("conditioner.embedders.0.model.") {
        "sdxl-refiner"
    } else if has("cond_stage_model.model.") {
        "sd21"
    } else if has("cond_stage_model.transformer.") {
        "sd15"
    } else {
        bail!(
            "'{}' is not a Stable Diffusion single-file checkpoint: it has neither cond_stage_model.* (SD1.x/2.x) \
             nor conditioner.embedders.* (SDXL) text encoder weights; pass --arch, or a diffusers folder",
            model.display()
        )
    })
}

/// Whether `path` looks like an SD checkpoint (a diffusers folder with unet/, or a single file with the UNet under
/// `model.diffusion_model.`), for `build` without `--arch`.
pub fn looks_like_sd(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("unet").is_dir();
    }
    path.extension().is_some_and(|e| e == "safetensors")
        && Checkpoint::open(path)
            .map(|ck| ck.contains("model.diffusion_model.input_blocks.0.0.weight"))
            .unwrap_or(false)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read '{}' (the component's transformers/diffusers config)",
            path.display()
        )
    })
}

impl ModelFiles {
    pub fn find(model: &Path, config: &SdPipelineConfig, clip_tok: Option<&Path>) -> Result<Self> {
        if model.is_dir() {
            let mut missing = Vec::new();
            let need = |sub: &str, missing: &mut Vec<String>| {
                let p = model.join(sub);
                if !p.exists() {
                    missing.push(format!("{sub}/"));
                }
                p
            };
            let unet = need("unet", &mut missing);
            let vae = need("vae", &mut missing);
            let mut text_encoders = Vec::new();
            let mut tokenizers = Vec::new();
            for spec in &config.text_encoders {
                text_encoders.push((need(&spec.component, &mut missing), String::new()));
                let tok_dir = spec.component.replace("text_encoder", "tokenizer");
                let tok = match clip_tok {
                    Some(p) => p.to_path_buf(),
                    None => ["vocab.json", "merges.txt", "tokenizer.json"]
                        .iter()
                        .map(|n| model.join(&tok_dir).join(n))
                        .find(|p| p.is_file())
                        .map(|p| {
                            // A vocab.json's merges sit beside it.
                            if p.ends_with("vocab.json") {
                                p.with_file_name("merges.txt")
                            } else {
                                p
                            }
                        })
                        .unwrap_or_else(|| {
                            missing.push(format!(
                                "{tok_dir}/merges.txt or tokenizer.json (or --clip-tokenizer)"
                            ));
                            PathBuf::new()
                        }),
                };
                tokenizers.push(tok);
            }
            if !missing.is_empty() {
                bail!(
                    "model folder '{}' lacks: {}; a {} folder in diffusers' layout has unet/, vae/, {} and their \
                     tokenizers",
                    model.display(),
                    missing.join(", "),
                    config.arch,
                    config
                        .text_encoders
                        .iter()
                        .map(|t| format!("{}/", t.component))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let sched = model.join("scheduler/scheduler_config.json");
            return Ok(Self {
                unet,
                vae,
                text_encoders,
                tokenizers,
                scheduler_config: sched.is_file().then_some(sched),
                single_file: false,
            });
        }
        if !model.is_file() {
            bail!("cannot open '{}': no such file or folder", model.display());
        }
        let Some(tok) = clip_tok else {
            bail!(
                "'{}' is a single-file checkpoint, which holds no tokenizer: pass --clip-tokenizer FILE (CLIP's \
                 merges.txt, bpe_simple_vocab_16e6.txt.gz or a tokenizer.json; every SD text encoder uses that \
                 vocabulary)",
                model.display()
            );
        };
        let ck = Checkpoint::open(model)?;
        let scopes: Vec<String> = match config.text_encoders.len() {
            2 => vec![
                "conditioner.embedders.0.".into(),
                "conditioner.embedders.1.".into(),
            ],
            _ if ck
                .names()
                .any(|k| k.starts_with("conditioner.embedders.0.")) =>
            {
                vec!["conditioner.embedders.0.".into()]
            }
            _ => vec!["cond_stage_model.".into()],
        };
        Ok(Self {
            unet: model.to_path_buf(),
            vae: model.to_path_buf(),
            text_encoders: scopes
                .into_iter()
                .map(|s| (model.to_path_buf(), s))
                .collect(),
            tokenizers: vec![tok.to_path_buf(); config.text_encoders.len()],
            scheduler_config: None,
            single_file: true,
        })
    }
}

/// Whether an SD2.x single file is a v-prediction model (768-v) or eps (512-base), as ComfyUI tells them: the
/// spread of the last attention block's first LayerNorm bias is larger in v models (ComfyUI's threshold 0.09).
fn sd2_prediction_of(ck: &Checkpoint) -> Result<SdPrediction> {
    let key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
    let Ok(t) = ck.get(key) else {
        return Ok(SdPrediction::V);
    };
    let v = t.to_f32()?;
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    Ok(if std > 0.09 {
        SdPrediction::V
    } else {
        SdPrediction::Eps
    })
}

/// Everything an export needs, read off the model.
pub struct Plan {
    pub files: ModelFiles,
    pub recipe: Recipe,
    pub config: SdPipelineConfig,
    pub unet: unet::UNetConfig,
    pub text: Vec<ClipTextConfig>,
    pub vae: vae::VaeConfig,
    /// LoRAs merged into the UNet and text encoders before export (`build --lora`).
    pub lora: Resolved,
}

impl Plan {
    /// Resolves `loras` (files at strengths) against the UNet's and text encoders' weights: every module must land
    /// on a layer (the error names those that do not).
    pub fn with_loras(mut self, loras: &[(LoraFile, f32)]) -> Result<Self> {
        self.lora = Resolved::default();
        if loras.is_empty() {
            return Ok(self);
        }
        let shapes = |p: &Path| -> Result<super::lora::Shapes> {
            Ok(super::lora::checkpoint_shapes(&Checkpoint::open(p)?))
        };
        let mut parts = vec![(Part::Denoiser, shapes(&self.files.unet)?)];
        for (spec, (path, scope)) in self
            .config
            .text_encoders
            .iter()
            .zip(&self.files.text_encoders)
        {
            if let Some(part) = super::lora::sd_part(&spec.component) {
                // A single file holds every component: each encoder's book sees only its own scope.
                let mut s = shapes(path)?;
                s.retain(|name, _| name.starts_with(scope.as_str()));
                parts.push((part, s));
            }
        }
        let refs: Vec<(Part, &super::lora::Shapes)> = parts.iter().map(|(p, s)| (*p, s)).collect();
        self.lora = super::lora::resolve_for(loras, &refs, super::lora::sd_book)?;
        Ok(self)
    }

    /// A component's checkpoint with the plan's LoRAs of `part` merged in.
    fn open_merged(&self, path: &Path, part: Option<Part>) -> Result<Checkpoint> {
        let mut ck = Checkpoint::open(path)?;
        if let Some(part) = part {
            let n = super::lora::merge_into_checkpoint(&mut ck, part, &self.lora)?;
            if n > 0 {
                tracing::info!("LoRA: merged into {n} weights of the {part}");
            }
        }
        Ok(ck)
    }
}

pub fn plan(model: &Path, arch: &str, clip_tok: Option<&Path>) -> Result<Plan> {
    let recipe: Recipe = super::recipe::load(arch)?;
    let mut config = SdPipelineConfig::for_arch(arch)?;
    let d = &recipe.defaults;
    config.default_steps = d.steps;
    config.default_cfg = d.cfg;
    config.default_sampler = d.sampler.clone();
    config.default_scheduler = d.scheduler.clone();
    config.default_width = d.width;
    config.default_height = d.height;
    let files = ModelFiles::find(model, &config, clip_tok)?;
    let uck = Checkpoint::open(&files.unet)?;
    let mut unet_cfg = unet::UNetConfig::from_checkpoint(&uck)?;
    if unet_cfg.added.is_some() && config.time_ids > 0 {
        unet_cfg = unet_cfg.with_time_ids(config.time_ids)?;
    }
    if unet_cfg.added.is_some() != (config.time_ids > 0) {
        bail!(
            "'{}' {} SDXL's added time/text embedding, so it is not {arch}; pass the right --arch (sdxl, \
             sdxl-refiner, sdxl-turbo for SDXL models; sd15, sd21, sd-turbo otherwise)",
            files.unet.display(),
            if unet_cfg.added.is_some() {
                "has"
            } else {
                "lacks"
            }
        );
    }
    let mut text = Vec::new();
    for (path, scope) in &files.text_encoders {
        let cfg = if files.single_file {
            // SD2.x's OpenCLIP-H conditions on its penultimate layer through the final LayerNorm: drop the last
            // (diffusers' SD2 text_encoder/ folders hold 23 of the 24 layers for the same reason).
            let skip = usize::from(matches!(arch, "sd21" | "sd-turbo"));
            let ck = Checkpoint::open(path)?;
            ClipTextConfig::from_checkpoint(&ck, scope, skip)?
        } else {
            ClipTextConfig::from_json(&read(&path.join("config.json"))?)?
        };
        text.push(cfg);
    }
    let vck = Checkpoint::open(&files.vae)?;
    let vae_cfg = vae::VaeConfig::from_checkpoint(&vck)?;
    config.latent_channels = vae_cfg.latent_channels;
    config.unet_in_channels = unet_cfg.in_channels;
    config.vae_scale_factor = 1 << (vae_cfg.block_out_channels.len().max(1) - 1);
    if files.vae.is_dir()
        && let Ok(t) = std::fs::read_to_string(files.vae.join("config.json"))
    {
        let v: serde_json::Value = serde_json::from_str(&t).with_context(|| {
            format!("'{}' is not JSON", files.vae.join("config.json").display())
        })?;
        if let Some(s) = v.get("scaling_factor").and_then(|x| x.as_f64()) {
            config.scaling_factor = s as f32;
        }
    }
    if files.single_file && arch == "sd21" {
        config.prediction = sd2_prediction_of(&uck)?;
    }
    if let Some(sched) = &files.scheduler_config {
        let v: serde_json::Value = serde_json::from_str(&read(sched)?)
            .with_context(|| format!("'{}' is not JSON", sched.display()))?;
        match v.get("prediction_type").and_then(|x| x.as_str()) {
            Some("epsilon") => config.prediction = SdPrediction::Eps,
            Some("v_prediction") => config.prediction = SdPrediction::V,
            Some(other) => bail!(
                "'{}': prediction_type '{other}' is not supported (epsilon, v_prediction)",
                sched.display()
            ),
            None => {}
        }
        config.zero_terminal_snr = v
            .get("rescale_betas_zero_snr")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
    }
    // The components must fit together.
    let ctx: usize = text.iter().map(|t| t.hidden_size).sum();
    if ctx != unet_cfg.cross_attention_dim {
        bail!(
            "the components do not fit together: the UNet's cross-attention width is {} but the text encoders give \
             {ctx} ({}): wrong --arch or mixed model files",
            unet_cfg.cross_attention_dim,
            text.iter()
                .map(|t| t.hidden_size.to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }
    if unet_cfg.out_channels != vae_cfg.latent_channels {
        bail!(
            "the components do not fit together: the UNet predicts {} channels, the VAE has {} latent channels",
            unet_cfg.out_channels,
            vae_cfg.latent_channels
        );
    }
    Ok(Plan {
        files,
        recipe,
        config,
        unet: unet_cfg,
        text,
        vae: vae_cfg,
        lora: Resolved::default(),
    })
}

/// Where each component's ONNX goes: `dir/<stem>.<component>.onnx` (bundle) or `dir/<component>.onnx` (an empty
/// stem: `export`).
pub fn onnx_path(dir: &Path, stem: &str, component: &str) -> PathBuf {
    if stem.is_empty() {
        dir.join(format!("{component}.onnx"))
    } else {
        dir.join(format!("{stem}.{component}.onnx"))
    }
}

/// `trt-diff export MODEL --arch A --out DIR`: one ONNX per component (`unet.onnx`, `text_encoder*.onnx`,
/// `vae_decoder.onnx`, `vae_encoder.onnx`), f32 unless `precision` says otherwise (FP8 needs the calibration
/// that only `build` runs). Returns the files written.
pub fn export_sd(
    model: &Path,
    arch: &str,
    precision: Precision,
    out_dir: &Path,
    clip_tok: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    if matches!(
        precision,
        Precision::Fp8 | Precision::Int8 | Precision::Auto
    ) {
        bail!(
            "{precision} needs calibrated activation scales: use `trt-diff build --precision {precision}`, which \
             calibrates"
        );
    }
    let p = plan(model, arch, clip_tok)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create '{}'", out_dir.display()))?;
    let mut files: Vec<PathBuf> = p
        .config
        .text_encoders
        .iter()
        .map(|t| onnx_path(out_dir, "", &t.component))
        .collect();
    files.extend(["vae_decoder", "vae_encoder", "unet"].map(|c| onnx_path(out_dir, "", c)));
    // All of the export's files or none (an error or a signal removes those already written).
    let mut guard = crate::fsutil::BundleGuard::new();
    for f in &files {
        guard.add(f);
        guard.add(f.with_file_name(format!("{}.data", file_name(f))));
    }
    let (text, vae_dt) = if precision == Precision::Fp32 {
        (DataType::FLOAT, DataType::FLOAT)
    } else {
        (
            dtype_named(&p.recipe.precision.text_encoders, "text encoder")?,
            dtype_named(&p.recipe.precision.vae, "VAE")?,
        )
    };
    export_aux(&p, out_dir, "", text, vae_dt)?;
    export_unet(
        &p,
        &unet_options(&p, precision, Calibration::default(), 0.0)?,
        &onnx_path(out_dir, "", "unet"),
    )?;
    guard.disarm();
    Ok(files)
}

fn dtype_named(name: &str, what: &str) -> Result<DataType> {
    Ok(match name {
        "fp32" | "f32" => DataType::FLOAT,
        "bf16" => DataType::BFLOAT16,
        "fp16" | "f16" => DataType::FLOAT16,
        other => bail!("{what} precision '{other}' is not one of fp32, bf16, fp16"),
    })
}

/// Writes the text encoders and both VAE halves (`text`, `vae_dt` compute types) as `<stem>.<component>.onnx`.
pub fn export_aux(
    p: &Plan,
    dir: &Path,
    stem: &str,
    text: DataType,
    vae_dt: DataType,
) -> Result<()> {
    for ((spec, cfg), (path, scope)) in p
        .config
        .text_encoders
        .iter()
        .zip(&p.text)
        .zip(&p.files.text_encoders)
    {
        let ck = p.open_merged(path, super::lora::sd_part(&spec.component))?;
        let opts = ClipOptions {
            scope: scope.clone(),
            penultimate: spec.hidden == "penultimate_hidden_state",
            projection: spec.pooled,
        };
        clip::export_with(
            cfg,
            &ck,
            text,
            &opts,
            &onnx_path(dir, stem, &spec.component),
        )?;
    }
    let ck = Checkpoint::open(&p.files.vae)?;
    let opts = SaveOptions::default();
    for (part, name) in [
        (vae::VaePart::Decoder, "vae_decoder"),
        (vae::VaePart::Encoder, "vae_encoder"),
    ] {
        save(
            vae::graph(&p.vae, &ck, part, vae_dt)?,
            &onnx_path(dir, stem, name),
            &opts,
        )?;
    }
    Ok(())
}

/// Calibrated activation ranges: per tensor by amax key, and per channel (SmoothQuant's).
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    pub amax: HashMap<String, f32>,
    pub channel_amax: HashMap<String, Vec<f32>>,
}

/// UNet export options for a precision (FP8/INT8 with the calibrated ranges; INT8 smoothed at `alpha` > 0).
fn unet_options(
    p: &Plan,
    precision: Precision,
    cal: Calibration,
    alpha: f32,
) -> Result<unet::UNetExportOptions> {
    let (compute, quantize) = match precision {
        Precision::Fp32 => (DataType::FLOAT, None),
        Precision::Fp16 => (DataType::FLOAT16, None),
        Precision::Bf16 => (DataType::BFLOAT16, None),
        Precision::Fp8 => (DataType::FLOAT, Some(LinearPrecision::Fp8)),
        Precision::Int8 => (DataType::FLOAT, Some(LinearPrecision::Int8)),
        Precision::Nvfp4 => (DataType::FLOAT, Some(LinearPrecision::Nvfp4)),
        other => bail!(
            "--precision {other} is not available for Stable Diffusion: use fp32, fp16, bf16, fp8, int8, nvfp4 or \
             auto"
        ),
    };
    let policy = match quantize {
        Some(q) => Some(unet::default_policy(q).with_overrides(&[], &p.recipe.precision.keep)?),
        None => None,
    };
    Ok(unet::UNetExportOptions {
        compute,
        quantize,
        policy,
        amax: cal.amax,
        smooth_alpha: smooth_alpha(quantize == Some(LinearPrecision::Int8), alpha)?,
        channel_amax: cal.channel_amax,
        ..Default::default()
    })
}

fn smooth_alpha(int8: bool, alpha: f32) -> Result<Option<f32>> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("smoothquant_alpha {alpha} is outside [0, 1] (0 turns SmoothQuant off)");
    }
    Ok((int8 && alpha > 0.0).then_some(alpha))
}

/// UNet export options with per-layer formats (`--precision auto`, `--policy`): every other layer kept in f32;
/// FP8/INT8 layers take their activation ranges from `cal`, INT8 ones smoothed at `alpha` > 0.
pub fn layered_options(
    layers: &BTreeMap<String, Format>,
    cal: &Calibration,
    alpha: f32,
) -> Result<unet::UNetExportOptions> {
    let policy = crate::quant::auto::policy_of(layers)?;
    // The target only sets the graph's opset and domains here: the policy decides every layer.
    let quantize = (policy.target != LinearPrecision::F32).then_some(policy.target);
    let int8 = layers.values().any(|f| *f == Format::Int8);
    Ok(unet::UNetExportOptions {
        quantize,
        policy: quantize.map(|_| policy),
        amax: cal.amax.clone(),
        smooth_alpha: smooth_alpha(int8, alpha)?,
        channel_amax: if int8 {
            cal.channel_amax.clone()
        } else {
            HashMap::new()
        },
        ..Default::default()
    })
}

/// Writes the UNet graph (with the plan's LoRAs merged) to `out`.
pub fn export_unet(p: &Plan, opts: &unet::UNetExportOptions, out: &Path) -> Result<()> {
    let ck = p.open_merged(&p.files.unet, Some(Part::Denoiser))?;
    unet::export(&p.unet, &ck, opts, out)?;
    Ok(())
}

fn tokenizers(p: &Plan) -> Result<Vec<ClipTokenizer>> {
    p.config
        .text_encoders
        .iter()
        .zip(&p.files.tokenizers)
        .map(|(spec, path)| {
            let mut t = ClipTokenizer::load(path)?;
            t.pad = spec.pad;
            Ok(t)
        })
        .collect()
}

/// The calibration pipeline: the bundle's f32 text encoders and VAE decoder (already exported as `<stem>.*.onnx`
/// in `dir`) around an f32 UNet with the calibration outputs (per channel too when `channels`); and the UNet's
/// linear layers.
fn calibration_pipeline(
    p: &Plan,
    dir: &Path,
    stem: &str,
    tmp: &Path,
    backend: BackendChoice,
    channels: bool,
) -> Result<(ImagePipeline<SdModel>, Vec<LinearShape>)> {
    let calib = tmp.join("calibration.unet.onnx");
    let opts = unet::UNetExportOptions {
        calibration: true,
        channel_calibration: channels,
        ..Default::default()
    };
    let ck = p.open_merged(&p.files.unet, Some(Part::Denoiser))?;
    let report = unet::export(&p.unet, &ck, &opts, &calib)?;
    let open = |path: &Path| open_file(&EngineFile::open(path)?, backend, &OpenOptions::default());
    let mut text_encoders = Vec::new();
    for spec in &p.config.text_encoders {
        text_encoders.push(open(&onnx_path(dir, stem, &spec.component))?);
    }
    let model = SdModel::new(
        p.config.clone(),
        tokenizers(p)?,
        SdEngines {
            text_encoders,
            unet: open(&calib)?,
            vae_decoder: open(&onnx_path(dir, stem, "vae_decoder"))?,
            vae_encoder: None,
            tae_decoder: None,
        },
    );
    Ok((ImagePipeline::new(model), report.linears))
}

/// The calibration image side: the recipe's, at most the profile's optimum, a multiple of 8.
fn calibration_side(p: &Plan) -> usize {
    let r = &p.recipe.precision;
    (r.calibration_px.min(p.recipe.shapes.image_px[1] as usize) / 8).max(1) * 8
}

/// Runs the recipe's calibration prompts through the sampler loop and returns each linear layer's input ranges.
fn calibrate(p: &Plan, pipe: &mut ImagePipeline<SdModel>) -> Result<Calibration> {
    pipe.model.amax = Some(HashMap::new());
    pipe.model.channel_amax = Some(HashMap::new());
    let r = &p.recipe.precision;
    // cfg 0: the family's default guidance, as generation will use.
    pipe.calibrate(
        &r.calibration_prompts,
        r.calibration_steps,
        calibration_side(p),
        0.0,
    )?;
    let amax = pipe.model.amax.take().unwrap_or_default();
    let channel_amax = pipe.model.channel_amax.take().unwrap_or_default();
    if amax.is_empty() {
        bail!("the calibration graph reported no activation ranges");
    }
    Ok(Calibration { amax, channel_amax })
}

/// `--precision auto` / `--policy`: the per-layer formats, searched on the calibration pipeline (whose UNet is the
/// unquantized reference) or read from the policy file; the chosen policy is written to `policy_out`.
#[allow(clippy::too_many_arguments)]
fn choose_layers(
    p: &Plan,
    o: &SdBuildOptions,
    arch: &str,
    dir: &Path,
    pipe: &mut ImagePipeline<SdModel>,
    shapes: &[LinearShape],
    cal: &Calibration,
    alpha: f32,
    policy_out: &Path,
) -> Result<BTreeMap<String, Format>> {
    // The NVIDIA-demo exclusions (time and added embeddings, every ResNet's time_emb_proj) and the recipe's `keep`
    // stay high in every SD engine, so they are not measured either.
    let keep =
        unet::default_policy(LinearPrecision::Fp8).with_overrides(&[], &p.recipe.precision.keep)?;
    let shapes = &o.auto.candidates(shapes, Some(&keep))?;
    let cand = dir.join("candidate.unet.onnx");
    let backend = o.calibration_backend;
    let swap = Box::new(
        move |m: &mut SdModel, layers: &BTreeMap<String, Format>| -> Result<()> {
            export_unet(p, &layered_options(layers, cal, alpha)?, &cand)?;
            m.engines.unet =
                open_file(&EngineFile::open(&cand)?, backend, &OpenOptions::default())?;
            Ok(())
        },
    );
    pipe.model.amax = None;
    pipe.model.channel_amax = None;
    let r = &p.recipe.precision;
    // GEMM rows at the profile's optimum: the tokens of the first (largest) attention level.
    let lat = (p.recipe.shapes.image_px[1] / p.config.vae_scale_factor as i64).max(1) as usize;
    let search = auto_precision::ImageSearch {
        arch,
        auto: &o.auto,
        targets: &o.base.targets,
        calibration_prompts: &r.calibration_prompts,
        heldout_prompts: &r.heldout_prompts,
        steps: r.calibration_steps,
        side: calibration_side(p),
        tokens: lat * lat,
        base_bytes: 4,
        policy_out,
    };
    auto_precision::choose_image_layers(&search, pipe, shapes, swap)
}

/// Optimization profiles of every component: batch, image side (height and width independently) and prompt
/// chunks from the recipe.
fn profiles(p: &Plan) -> BTreeMap<String, Vec<ShapeRange>> {
    let s = &p.recipe.shapes;
    let c = &p.config;
    let f = c.vae_scale_factor as i64;
    let lat = |i: usize| (s.image_px[i] / f).max(1);
    let b = s.batch;
    let range = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let mut m = BTreeMap::new();
    let u = unet::profile(&p.unet, b, [lat(0), lat(1), lat(2)], s.prompt_chunks);
    m.insert("unet".to_string(), u);
    for spec in &c.text_encoders {
        m.insert(
            spec.component.clone(),
            vec![range("input_ids", &|_| vec![1, 77])],
        );
    }
    let lc = c.latent_channels as i64;
    m.insert(
        "vae_decoder".into(),
        vec![range("latent", &|i| vec![b[i], lc, lat(i), lat(i)])],
    );
    m.insert(
        "vae_encoder".into(),
        vec![range("image", &|i| vec![1, 3, lat(i) * f, lat(i) * f])],
    );
    m
}

pub struct SdBuildOptions {
    pub model: PathBuf,
    /// None: read off the files ([`detect_arch`]).
    pub arch: Option<String>,
    pub precision: Precision,
    /// The CLIP vocabulary (needed for single files; overrides a folder's tokenizers).
    pub clip_tokenizer: Option<PathBuf>,
    /// madebyollin's TAESD / TAESDXL decoder for previews.
    pub tae_decoder: Option<PathBuf>,
    pub image_px: Option<[i64; 3]>,
    pub calibration_prompts: Option<Vec<String>>,
    pub calibration_steps: Option<usize>,
    pub calibration_backend: BackendChoice,
    /// LoRA files at strengths, merged into the weights before export and quantization.
    pub loras: Vec<LoraSpec>,
    /// FP8/NVFP4: rank of the LoRA side path beside each quantized UNet linear (0: none).
    pub lora_rank: usize,
    /// A diffusers ControlNetModel folder: its engine joins the bundle and the UNet takes its residuals.
    pub controlnet: Option<PathBuf>,
    /// INT8: SmoothQuant's alpha instead of the recipe's `smoothquant_alpha` (0: no smoothing).
    pub smoothquant_alpha: Option<f32>,
    /// `--precision auto --quality` / `--policy FILE`: per-layer formats, written to `NAME.policy.toml`.
    pub auto: AutoOptions,
    pub base: BuildOptions,
}

/// Exports the ControlNet of `dir` (a diffusers `ControlNetModel` folder) for the plan's UNet to `out`, in f32
/// unless `compute` says otherwise (a quantized UNet's ControlNet stays in f32).
pub fn export_controlnet(
    p: &Plan,
    dir: &Path,
    compute: DataType,
    out: &Path,
) -> Result<Option<unet::UnionConfig>> {
    let ck = Checkpoint::open(dir).with_context(|| format!("--controlnet '{}'", dir.display()))?;
    let cfg = unet::UNetConfig::from_checkpoint(&ck)
        .with_context(|| format!("--controlnet '{}'", dir.display()))?;
    let u = &p.unet;
    for (what, a, b) in [
        (
            "level widths",
            format!("{:?}", cfg.block_out_channels),
            format!("{:?}", u.block_out_channels),
        ),
        (
            "ResNets per level",
            cfg.layers_per_block.to_string(),
            u.layers_per_block.to_string(),
        ),
        (
            "cross-attention width",
            cfg.cross_attention_dim.to_string(),
            u.cross_attention_dim.to_string(),
        ),
        (
            "added conditioning",
            format!("{:?}", cfg.added),
            format!("{:?}", u.added),
        ),
    ] {
        if a != b {
            bail!(
                "--controlnet '{}' does not fit this model: its {what} are {a}, the UNet's {b}",
                dir.display()
            );
        }
    }
    let opts = unet::UNetExportOptions {
        compute,
        ..Default::default()
    };
    let graph = unet::controlnet_graph(&cfg, &ck, &opts)
        .with_context(|| format!("--controlnet '{}'", dir.display()))?;
    save(graph, out, &SaveOptions::default())?;
    match ck.contains(&cfg.name("task_embedding")) {
        true => Ok(Some(unet::UnionConfig::read(&cfg, &ck)?)),
        false => Ok(None),
    }
}

/// The most controls a ControlNet-Union engine's TensorRT profile takes in one call.
pub const MAX_UNION_CONTROLS: i64 = 4;

/// Exports, calibrates (FP8), builds every component, and writes the bundle's manifest.
pub fn build_sd(o: &SdBuildOptions) -> Result<BuildOutcome> {
    let arch = match &o.arch {
        Some(a) => a.clone(),
        None => detect_arch(&o.model)?.to_string(),
    };
    let mut p =
        plan(&o.model, &arch, o.clip_tokenizer.as_deref())?.with_loras(&open_all(&o.loras)?)?;
    if o.lora_rank > 0 {
        if !matches!(o.precision, Precision::Fp8 | Precision::Nvfp4) {
            bail!(
                "--lora-rank adds a LoRA side path to FP8/NVFP4 layers; {} engines take LoRAs at run time by \
                 merging and refitting their weights: drop --lora-rank (and build with --refit for TensorRT)",
                o.precision
            );
        }
        if !o.base.refit {
            tracing::warn!(
                "--lora-rank without --refit: ONNX Runtime switches LoRAs through the side path, but TensorRT \
                 folds its zero weights into constants; add --refit (a GPU build) for TensorRT"
            );
        }
    }
    if let Some(v) = &o.calibration_prompts
        && !v.is_empty()
    {
        p.recipe.precision.calibration_prompts = v.clone();
    }
    if let Some(n) = o.calibration_steps {
        p.recipe.precision.calibration_steps = n.max(1);
    }
    if let Some(px) = o.image_px {
        if px.iter().any(|v| *v <= 0 || v % 8 != 0) || px[0] > px[1] || px[1] > px[2] {
            bail!(
                "--image-px {px:?}: three increasing multiples of 8 (min, opt, max side in pixels)"
            );
        }
        p.recipe.shapes.image_px = px;
    }
    let stem = o
        .base
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sd".into());
    let dir = o
        .base
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    // All of the bundle's files (`<stem>.*`) or none.
    let guard = crate::fsutil::BundleGuard::watch(&dir, &format!("{stem}."));
    // Tokenizers first: a bad vocabulary fails before any export.
    let toks = tokenizers(&p)?;
    drop(toks);
    let f32t = DataType::FLOAT;
    tracing::info!("exporting the text encoders and the VAE");
    // The bundle's ONNX graphs are what the CPU backend runs (f32); engines in another precision are built from
    // their own graphs (`<stem>.trt.<component>.onnx`). The SDXL VAE overflows in f16: the recipes keep it bf16.
    export_aux(&p, &dir, &stem, f32t, f32t)?;
    let (text, vae_dt) = if o.precision == Precision::Fp32 {
        (f32t, f32t)
    } else {
        (
            dtype_named(&p.recipe.precision.text_encoders, "text encoder")?,
            dtype_named(&p.recipe.precision.vae, "VAE")?,
        )
    };
    let trt_stem = format!("{stem}.trt");
    let trt_aux = (text, vae_dt) != (f32t, f32t);
    if trt_aux {
        export_aux(&p, &dir, &trt_stem, text, vae_dt)?;
    }
    let layered = o.auto.per_layer(o.precision)?;
    let alpha = o
        .smoothquant_alpha
        .unwrap_or(p.recipe.precision.smoothquant_alpha);
    let policy_out = sibling(&o.base.out, ".policy.toml");
    let mut uopts = if matches!(o.precision, Precision::Fp8 | Precision::Int8) || layered {
        let tmp = tempfile::tempdir_in(&dir).context("cannot create a calibration folder")?;
        let channels = o.precision == Precision::Int8 || layered;
        let (mut pipe, shapes) =
            calibration_pipeline(&p, &dir, &stem, tmp.path(), o.calibration_backend, channels)?;
        let cal = calibrate(&p, &mut pipe)?;
        if layered {
            let layers = choose_layers(
                &p,
                o,
                &arch,
                tmp.path(),
                &mut pipe,
                &shapes,
                &cal,
                alpha,
                &policy_out,
            )?;
            layered_options(&layers, &cal, alpha)?
        } else {
            unet_options(&p, o.precision, cal, alpha)?
        }
    } else {
        unet_options(&p, o.precision, Calibration::default(), alpha)?
    };
    tracing::info!("exporting the UNet ({})", o.precision);
    let unet_onnx = onnx_path(&dir, &stem, "unet");
    if uopts.quantize.is_some() {
        uopts.lora_rank = o.lora_rank;
    }
    let controlnet = match &o.controlnet {
        Some(cn_dir) => {
            let out = onnx_path(&dir, &stem, "controlnet");
            let compute = if uopts.quantize.is_some() {
                f32t
            } else {
                uopts.compute
            };
            let union = export_controlnet(&p, cn_dir, compute, &out)?;
            uopts.controlnet_residuals = true;
            p.config.controlnet_levels = unet::controlnet_residuals(&p.unet)
                .iter()
                .map(|r| r.level)
                .collect();
            Some((out, union))
        }
        None => None,
    };
    export_unet(&p, &uopts, &unet_onnx)?;
    let mut tokenizer_files = BTreeMap::new();
    for (spec, src) in p.config.text_encoders.iter().zip(&p.files.tokenizers) {
        let ext = match src.extension().and_then(|e| e.to_str()) {
            Some("gz") => ".txt.gz",
            Some("json") => ".json",
            _ => ".txt",
        };
        let dst = sibling(&o.base.out, &format!(".{}-tokenizer{ext}", spec.component));
        crate::fsutil::copy_atomic(src, &dst)?;
        tokenizer_files.insert(spec.component.clone(), file_name(&dst));
    }
    let mut names: Vec<String> = p
        .config
        .text_encoders
        .iter()
        .map(|t| t.component.clone())
        .collect();
    names.extend(["vae_decoder".into(), "vae_encoder".into()]);
    let trt_src = |name: &str| {
        if trt_aux {
            onnx_path(&dir, &trt_stem, name)
        } else {
            onnx_path(&dir, &stem, name)
        }
    };
    let mut aux: Vec<(String, PathBuf, PathBuf)> = names
        .iter()
        .map(|n| (n.clone(), onnx_path(&dir, &stem, n), trt_src(n)))
        .collect();
    if let Some(tae) = &o.tae_decoder {
        let ck = Checkpoint::open(tae)?;
        let cfg = taesd::TaesdConfig::from_checkpoint(&ck, taesd::TaeKind::Decoder)?;
        let out = onnx_path(&dir, &stem, "tae_decoder");
        save(
            taesd::graph(&cfg, &ck, DataType::FLOAT)?,
            &out,
            &SaveOptions::default(),
        )?;
        aux.push(("tae_decoder".into(), out.clone(), out));
    }
    let mut profiles = profiles(&p);
    if let Some((cn, union)) = controlnet {
        // The ControlNet takes the UNet's inputs plus the control image and the scale; the UNet its residuals.
        let u = profiles.get_mut("unet").context("UNet profile")?;
        let sample = u
            .iter()
            .find(|r| r.name == "sample")
            .cloned()
            .context("sample profile")?;
        let mut cn_shapes: Vec<ShapeRange> = u.clone();
        let f = p.config.vae_scale_factor as i64;
        let px = |v: &[i64]| vec![v[0], 3, v[2] * f, v[3] * f];
        match &union {
            // A union ControlNet takes 1..MAX_UNION_CONTROLS controls per call, with their types and scales.
            Some(u) => {
                let k = |n: i64, v: &[i64]| [vec![n], px(v)].concat();
                let types = u.types as i64;
                for (name, min, opt, max) in [
                    (
                        "controlnet_cond",
                        k(1, &sample.min),
                        k(1, &sample.opt),
                        k(MAX_UNION_CONTROLS, &sample.max),
                    ),
                    (
                        "control_type",
                        vec![sample.min[0], types],
                        vec![sample.opt[0], types],
                        vec![sample.max[0], types],
                    ),
                    ("control_mode", vec![1], vec![1], vec![MAX_UNION_CONTROLS]),
                    ("control_scales", vec![1], vec![1], vec![MAX_UNION_CONTROLS]),
                ] {
                    cn_shapes.push(ShapeRange {
                        name: name.into(),
                        min,
                        opt,
                        max,
                    });
                }
            }
            None => cn_shapes.push(ShapeRange {
                name: "controlnet_cond".into(),
                min: px(&sample.min),
                opt: px(&sample.opt),
                max: px(&sample.max),
            }),
        }
        cn_shapes.push(ShapeRange {
            name: "conditioning_scale".into(),
            min: vec![1],
            opt: vec![1],
            max: vec![1],
        });
        for r in unet::controlnet_residuals(&p.unet) {
            let s = |v: &[i64]| {
                r.shape(v[0] as usize, v[2] as usize, v[3] as usize)
                    .map(|x| x as i64)
                    .to_vec()
            };
            u.push(ShapeRange {
                name: r.name.clone(),
                min: s(&sample.min),
                opt: s(&sample.opt),
                max: s(&sample.max),
            });
        }
        aux.push(("controlnet".into(), cn.clone(), cn));
        profiles.insert("controlnet".into(), cn_shapes);
    }
    let components: Vec<ComponentGraphs> = aux
        .into_iter()
        .map(|(name, cpu_onnx, trt_onnx)| ComponentGraphs {
            shapes: profiles.remove(&name).unwrap_or_default(),
            name,
            cpu_onnx,
            trt_onnx,
        })
        .collect();
    let denoiser = ComponentGraphs {
        name: "unet".into(),
        cpu_onnx: unet_onnx.clone(),
        trt_onnx: unet_onnx,
        shapes: profiles.remove("unet").unwrap_or_default(),
    };
    let bundle = ImageBundle {
        arch: arch.clone(),
        precision: if layered { "auto" } else { o.precision.name() }.into(),
        config: serde_json::to_value(&p.config)?,
        components: BTreeMap::new(),
        tokenizers: tokenizer_files,
    };
    let outcome = build_bundle(&o.base, &components, denoiser, bundle)?;
    guard.disarm();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sd_recipe_reads_and_matches_its_arch() {
        for arch in [
            "sd15",
            "sd21",
            "sd-turbo",
            "sdxl",
            "sdxl-refiner",
            "sdxl-turbo",
        ] {
            let r: Recipe = crate::pipelines::recipe::load(arch).unwrap();
            assert_eq!(r.arch, arch);
            let c = SdPipelineConfig::for_arch(arch).unwrap();
            let px = r.shapes.image_px;
            assert!(px[0] <= px[1] && px[1] <= px[2], "{arch}");
            assert!(r.defaults.width as i64 <= px[2], "{arch}");
            // Turbo models run without CFG; the others guide.
            assert_eq!(r.defaults.cfg > 1.0, !arch.ends_with("turbo"), "{arch}");
            let two = arch == "sdxl" || arch == "sdxl-turbo";
            assert_eq!(c.text_encoders.len(), if two { 2 } else { 1 }, "{arch}");
        }
    }

    #[test]
    fn missing_parts_are_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("unet")).unwrap();
        std::fs::create_dir_all(d.path().join("text_encoder")).unwrap();
        let c = SdPipelineConfig::for_arch("sdxl").unwrap();
        let e = ModelFiles::find(d.path(), &c, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vae/") && e.contains("text_encoder_2/") && e.contains("tokenizer"),
            "{e}"
        );
        let f = d.path().join("model.safetensors");
        std::fs::write(&f, b"").unwrap();
        let e = ModelFiles::find(&f, &c, None).unwrap_err().to_string();
        assert!(e.contains("--clip-tokenizer"), "{e}");
    }
}
