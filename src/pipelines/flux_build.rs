//! Flux bundles. `trt-diff build MODEL_DIR --arch flux-dev|flux-schnell --precision P --out NAME.plan` exports every
//! component of a diffusers-layout model folder (transformer/, text_encoder/ (CLIP-L), text_encoder_2/ (T5),
//! vae/, tokenizer/, tokenizer_2/) to `NAME.<component>.onnx`, builds a TensorRT engine of each (the transformer's
//! is `NAME.plan` itself, the others `NAME.<component>.plan`), copies the tokenizers, and records the pipeline in
//! `NAME.plan.json`. `generate --engine NAME.plan` opens each component on TensorRT when usable, else its ONNX on
//! ONNX Runtime. Recipes (engines/flux-*.toml, compiled in) give the defaults, shapes and precision policy.
use super::auto_precision::{self, AutoOptions};
use super::bundle::{ComponentGraphs, build_bundle, file_name, sibling};
use super::engines::{OpenOptions, open_file};
use super::flux::{FluxEngines, FluxModel, FluxPipelineConfig, load_clip_tokenizer};
use super::image::ImagePipeline;
use crate::backend::BackendChoice;
use crate::manifest::{EngineFile, ImageBundle, ShapeRange};
use crate::models::{clip, flux as fluxm, t5, taesd, vae};
use crate::onnx::{DataType, SaveOptions, save};
use crate::quant::Precision;
use crate::quant::auto::{Format, LinearShape};
use crate::tokenizer::t5::T5Tokenizer;
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
    pub guidance: f32,
    pub sampler: String,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub t5_max_len: usize,
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeShapes {
    pub batch: [i64; 3],
    pub image_px: [i64; 3],
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipePrecision {
    pub text_encoders: String,
    pub vae: String,
    pub keep: Vec<String>,
    pub calibration_steps: usize,
    pub calibration_px: usize,
    pub calibration_prompts: Vec<String>,
    /// `--precision auto` verifies its choice on these.
    #[serde(default)]
    pub heldout_prompts: Vec<String>,
}

/// A diffusers-layout Flux folder, resolved.
pub struct ModelFiles {
    pub transformer: PathBuf,
    pub clip: PathBuf,
    pub t5: PathBuf,
    pub vae: PathBuf,
    pub clip_tokenizer: PathBuf,
    pub t5_tokenizer: PathBuf,
}

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.exists())
}

impl ModelFiles {
    /// Finds the components; tokenizer paths may be given explicitly (folders without tokenizer files).
    pub fn find(model: &Path, clip_tok: Option<&Path>, t5_tok: Option<&Path>) -> Result<Self> {
        if !model.is_dir() {
            bail!(
                "'{}' is not a folder: --arch flux-* builds take a diffusers-layout model folder (transformer/, \
                 text_encoder/, text_encoder_2/, vae/, tokenizer/, tokenizer_2/)",
                model.display()
            );
        }
        let mut missing = Vec::new();
        // Black Forest Labs' single files (flux1-dev.safetensors, ae.safetensors) stand in for transformer/ and
        // vae/ (the emitters read both layouts).
        let bfl = crate::fsutil::safetensors_named(model, "flux1-")?;
        let mut need = |sub: &str, single: Option<PathBuf>| {
            let p = model.join(sub);
            if p.is_dir() {
                return p;
            }
            match single {
                Some(f) if f.is_file() => f,
                _ => {
                    missing.push(format!("{sub}/"));
                    p
                }
            }
        };
        let (transformer, clip, t5, vae) = (
            need("transformer", bfl),
            need("text_encoder", None),
            need("text_encoder_2", None),
            need("vae", Some(model.join("ae.safetensors"))),
        );
        let clip_tokenizer = match clip_tok {
            Some(p) => Some(p.to_path_buf()),
            None => first_existing(
                &model.join("tokenizer"),
                &[
                    "merges.txt",
                    "bpe_simple_vocab_16e6.txt.gz",
                    "tokenizer.json",
                ],
            ),
        };
        let t5_tokenizer = match t5_tok {
            Some(p) => Some(p.to_path_buf()),
            None => first_existing(&model.join("tokenizer_2"), &["tokenizer.json"]),
        };
        if clip_tokenizer.is_none() {
            missing.push(
                "tokenizer/merges.txt or tokenizer/tokenizer.json (or --clip-tokenizer)".into(),
            );
        }
        if t5_tokenizer.is_none() {
            missing.push("tokenizer_2/tokenizer.json (or --t5-tokenizer)".into());
        }
        if !missing.is_empty() {
            bail!(
                "model folder '{}' lacks: {}; it must have diffusers' FLUX.1 layout (flux1-*.safetensors and \
                 ae.safetensors may stand in for transformer/ and vae/)",
                model.display(),
                missing.join(", ")
            );
        }
        Ok(Self {
            transformer,
            clip,
            t5,
            vae,
            clip_tokenizer: clip_tokenizer.expect("checked"),
            t5_tokenizer: t5_tokenizer.expect("checked"),
        })
    }
}

fn dtype_named(name: &str, what: &str) -> Result<DataType> {
    Ok(match name {
        "fp32" | "f32" => DataType::FLOAT,
        "bf16" => DataType::BFLOAT16,
        "fp16" | "f16" => DataType::FLOAT16,
        other => bail!("{what} precision '{other}' is not one of fp32, bf16, fp16"),
    })
}

fn read_json(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read '{}' (the component's transformers/diffusers config)",
            path.display()
        )
    })
}

/// Everything an export needs to know, read off the model folder.
pub struct Plan {
    pub files: ModelFiles,
    pub recipe: Recipe,
    pub config: FluxPipelineConfig,
    pub transformer: fluxm::FluxConfig,
    pub clip: clip::ClipTextConfig,
    pub t5: t5::T5Config,
    pub vae: vae::VaeConfig,
    /// LoRAs merged into the transformer and text encoders before export (`build --lora`).
    pub lora: Resolved,
}

impl Plan {
    /// Resolves `loras` (files at strengths) against the model's transformer, CLIP and T5 weights: every module
    /// must land on a layer. Exports then merge them before any quantization.
    pub fn with_loras(mut self, loras: &[(LoraFile, f32)]) -> Result<Self> {
        if loras.is_empty() {
            self.lora = Resolved::default();
            return Ok(self);
        }
        let shapes = |p: &Path| -> Result<super::lora::Shapes> {
            Ok(super::lora::checkpoint_shapes(&Checkpoint::open(p)?))
        };
        let (t, c, t5) = (
            shapes(&self.files.transformer)?,
            shapes(&self.files.clip)?,
            shapes(&self.files.t5)?,
        );
        self.lora = super::lora::resolve_for(
            loras,
            &[
                (Part::Denoiser, &t),
                (Part::TextEncoder(0), &c),
                (Part::TextEncoder(1), &t5),
            ],
            super::lora::flux_book,
        )?;
        Ok(self)
    }

    /// A component's checkpoint with the plan's LoRAs merged in.
    fn checkpoint(&self, path: &Path, part: Part) -> Result<Checkpoint> {
        let mut ck = Checkpoint::open(path)?;
        let n = super::lora::merge_into_checkpoint(&mut ck, part, &self.lora)?;
        if n > 0 {
            tracing::info!("LoRA: merged into {n} weights of the {part}");
        }
        Ok(ck)
    }
}

pub fn plan(files: ModelFiles, arch: &str, t5_max_len: Option<usize>) -> Result<Plan> {
    let recipe: Recipe = super::recipe::load(arch)?;
    let mut config = FluxPipelineConfig::for_arch(arch)?;
    let d = &recipe.defaults;
    config.default_steps = d.steps;
    config.default_guidance = d.guidance;
    config.default_sampler = d.sampler.clone();
    config.default_scheduler = d.scheduler.clone();
    config.default_width = d.width;
    config.default_height = d.height;
    config.t5_max_len = t5_max_len.unwrap_or(d.t5_max_len);
    if !(1..=512).contains(&config.t5_max_len) {
        bail!("the T5 length must be 1..512, got {}", config.t5_max_len);
    }
    let tck = Checkpoint::open(&files.transformer)?;
    let (transformer, _, _) = fluxm::FluxConfig::from_checkpoint(&tck)?;
    if transformer.guidance_embed != config.guidance_embeds {
        bail!(
            "'{}' {} a guidance embedding, so it is not {arch}; use --arch {}",
            files.transformer.display(),
            if transformer.guidance_embed {
                "has"
            } else {
                "lacks"
            },
            if transformer.guidance_embed {
                "flux-dev"
            } else {
                "flux-schnell"
            }
        );
    }
    let clip = clip::ClipTextConfig::from_json(&read_json(&files.clip.join("config.json"))?)?;
    let t5 = t5::T5Config::from_json(
        &read_json(&files.t5.join("config.json"))?,
        config.t5_max_len,
    )?;
    let vck = Checkpoint::open(&files.vae)?;
    let vae = vae::VaeConfig::from_checkpoint(&vck)?;
    config.latent_channels = vae.latent_channels;
    config.vae_scale_factor = 1 << (vae.block_out_channels.len().max(1) - 1);
    // ae.safetensors has no config: Flux's scaling and shift stay.
    if files.vae.is_dir()
        && let Ok(text) = std::fs::read_to_string(files.vae.join("config.json"))
    {
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!("'{}' is not JSON", files.vae.join("config.json").display())
        })?;
        if let Some(s) = v.get("scaling_factor").and_then(|x| x.as_f64()) {
            config.scaling_factor = s as f32;
        }
        if let Some(s) = v.get("shift_factor").and_then(|x| x.as_f64()) {
            config.shift_factor = s as f32;
        }
    }
    // FLUX.1 Canny/Depth take the packed control latents beside the image latents: twice the channels.
    let packed = 4 * vae.latent_channels;
    config.control_channels =
        if transformer.in_channels == 2 * packed && transformer.out_channels == packed {
            packed
        } else {
            0
        };
    // FLUX.1 Fill takes the packed masked-image latents and the packed mask (vs x vs channels per latent).
    let mask_channels = 4 * config.vae_scale_factor * config.vae_scale_factor;
    if transformer.in_channels == 2 * packed + mask_channels && transformer.out_channels == packed {
        config.fill_channels = packed + mask_channels;
    }
    let checks = [
        (
            transformer.in_channels - config.control_channels - config.fill_channels,
            packed,
            "transformer input channels vs 4 x VAE latent channels",
        ),
        (
            transformer.context_dim,
            t5.d_model,
            "transformer context dim vs T5 d_model",
        ),
        (
            transformer.vec_dim,
            clip.hidden_size,
            "transformer pooled dim vs CLIP hidden size",
        ),
    ];
    for (a, b, what) in checks {
        if a != b {
            bail!("the model folder's components do not fit together: {what} ({a} != {b})");
        }
    }
    Ok(Plan {
        files,
        recipe,
        config,
        transformer,
        clip,
        t5,
        vae,
        lora: Resolved::default(),
    })
}

/// Where each component's ONNX goes.
pub struct OnnxPaths {
    pub transformer: PathBuf,
    pub clip: PathBuf,
    pub t5: PathBuf,
    pub vae_decoder: PathBuf,
    pub vae_encoder: PathBuf,
}

impl OnnxPaths {
    /// `dir/<component>.onnx` (export) or `dir/<stem>.<component>.onnx` (bundle).
    pub fn new(dir: &Path, stem: Option<&str>) -> Self {
        let p = |c: &str| match stem {
            Some(s) => dir.join(format!("{s}.{c}.onnx")),
            None => dir.join(format!("{c}.onnx")),
        };
        Self {
            transformer: p("transformer"),
            clip: p("clip"),
            t5: p("t5"),
            vae_decoder: p("vae_decoder"),
            vae_encoder: p("vae_encoder"),
        }
    }
}

/// Writes the text encoders and the VAE halves in the given dtypes.
pub fn export_aux(p: &Plan, paths: &OnnxPaths, text: DataType, vae_dt: DataType) -> Result<()> {
    let opts = SaveOptions::default();
    let ck = p.checkpoint(&p.files.clip, Part::TextEncoder(0))?;
    // CLIP-L is fine in f16/bf16; T5 never in f16.
    save(clip::graph(&p.clip, &ck, text)?, &paths.clip, &opts)?;
    let ck = p.checkpoint(&p.files.t5, Part::TextEncoder(1))?;
    let t5_dt = if text == DataType::FLOAT16 {
        DataType::BFLOAT16
    } else {
        text
    };
    t5::export(&p.t5, &ck, t5_dt, &paths.t5)?;
    let ck = Checkpoint::open(&p.files.vae)?;
    let dec = vae::graph(&p.vae, &ck, vae::VaePart::Decoder, vae_dt)?;
    save(dec, &paths.vae_decoder, &opts)?;
    let enc = vae::graph(&p.vae, &ck, vae::VaePart::Encoder, vae_dt)?;
    save(enc, &paths.vae_encoder, &opts)?;
    Ok(())
}

/// The transformer graph, streamed to `out`.
pub fn export_transformer(
    p: &Plan,
    opts: &fluxm::ExportOptions,
    out: &Path,
) -> Result<fluxm::ExportReport> {
    let ck = p.checkpoint(&p.files.transformer, Part::Denoiser)?;
    fluxm::export(&p.transformer, &ck, opts, out)
}

/// Export options of a transformer with per-layer formats (`--precision auto`, `--policy`): every other layer
/// kept in f32; FP8/INT8 layers take their activation ranges from `amax`.
pub fn layered_options(
    layers: &BTreeMap<String, Format>,
    amax: &HashMap<String, f32>,
) -> Result<fluxm::ExportOptions> {
    let (precision, policy) = auto_precision::layered_policy(layers)?;
    Ok(fluxm::ExportOptions {
        precision,
        policy,
        amax: amax.clone(),
        ..Default::default()
    })
}

fn transformer_options(
    p: &Plan,
    precision: Precision,
    amax: HashMap<String, f32>,
) -> Result<fluxm::ExportOptions> {
    let prec = fluxm::FluxPrecision::from_precision(precision)?;
    let policy = match prec {
        fluxm::FluxPrecision::Fp8 | fluxm::FluxPrecision::Nvfp4 => {
            let target = if prec == fluxm::FluxPrecision::Fp8 {
                crate::quant::LinearPrecision::Fp8
            } else {
                crate::quant::LinearPrecision::Nvfp4
            };
            Some(fluxm::default_policy(target).with_overrides(&[], &p.recipe.precision.keep)?)
        }
        _ => None,
    };
    Ok(fluxm::ExportOptions {
        precision: prec,
        policy,
        amax,
        ..Default::default()
    })
}

/// `trt-diff export MODEL --arch A --out DIR`: one ONNX per component (fp32 unless `precision` says otherwise;
/// FP8 needs a calibration and is only made by `build`).
pub fn export_flux(
    model: &Path,
    arch: &str,
    precision: Precision,
    out_dir: &Path,
    clip_tok: Option<&Path>,
    t5_tok: Option<&Path>,
) -> Result<OnnxPaths> {
    let p = plan(ModelFiles::find(model, clip_tok, t5_tok)?, arch, None)?;
    if precision == Precision::Fp8 {
        bail!(
            "FP8 needs calibrated activation scales: use `trt-diff build --precision fp8`, which calibrates"
        );
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create '{}'", out_dir.display()))?;
    let paths = OnnxPaths::new(out_dir, None);
    // All of the export's files or none (an error or a signal removes those already written).
    let mut guard = crate::fsutil::BundleGuard::new();
    for f in [
        &paths.transformer,
        &paths.clip,
        &paths.t5,
        &paths.vae_decoder,
        &paths.vae_encoder,
    ] {
        guard.add(f);
        guard.add(f.with_file_name(format!("{}.data", file_name(f))));
    }
    let (text, vae_dt) = aux_precisions(&p, precision)?;
    export_aux(&p, &paths, text, vae_dt)?;
    export_transformer(
        &p,
        &transformer_options(&p, precision, HashMap::new())?,
        &paths.transformer,
    )?;
    guard.disarm();
    Ok(paths)
}

/// Exports a diffusers FluxControlNetModel folder beside the bundle (`out`): in the build's precision when that is
/// 16- or 32-bit, in f32 beside FP8/NVFP4 transformers (the ControlNet is not quantized). Returns the graph, the
/// ControlNet's config and its number of control modes (ControlNet-Union's `num_mode`; 0 for a plain one).
pub fn export_controlnet(
    p: &Plan,
    dir: &Path,
    precision: Precision,
    out: &Path,
) -> Result<(PathBuf, fluxm::FluxConfig, usize)> {
    let ck = Checkpoint::open(dir).with_context(|| format!("--controlnet '{}'", dir.display()))?;
    if !ck
        .names()
        .any(|n| n.starts_with("controlnet_blocks.") || n.starts_with("controlnet_single_blocks."))
    {
        bail!(
            "--controlnet '{}' has no controlnet_blocks.*: not a diffusers FluxControlNetModel (InstantX / Shakker \
             style); point at its folder",
            dir.display()
        );
    }
    if ck.names().any(|n| n.starts_with("input_hint_block")) {
        bail!(
            "--controlnet '{}' has an input hint block (XLabs style): trt-diff runs InstantX / Shakker style \
             FluxControlNetModel checkpoints (plain or Union) only",
            dir.display()
        );
    }
    let modes = match ck.contains("controlnet_mode_embedder.weight") {
        true => {
            let t = ck.get("controlnet_mode_embedder.weight")?;
            match t.shape[..] {
                [n, _] if n > 0 => n,
                _ => bail!(
                    "--controlnet '{}': controlnet_mode_embedder.weight is {:?}, expected [num_mode, hidden]",
                    dir.display(),
                    t.shape
                ),
            }
        }
        false => 0,
    };
    let (cfg, _, _) = fluxm::FluxConfig::from_checkpoint(&ck)?;
    let t = &p.transformer;
    for (what, a, b) in [
        ("hidden size", cfg.hidden_size, t.hidden_size),
        ("input channels", cfg.in_channels, t.in_channels),
        ("text width", cfg.context_dim, t.context_dim),
        ("pooled width", cfg.vec_dim, t.vec_dim),
    ] {
        if a != b {
            bail!(
                "--controlnet '{}' does not fit this model: its {what} is {a}, the transformer's {b}",
                dir.display()
            );
        }
    }
    let prec = match precision {
        Precision::Auto => fluxm::FluxPrecision::F32,
        _ => match fluxm::FluxPrecision::from_precision(precision)? {
            fluxm::FluxPrecision::Fp8 | fluxm::FluxPrecision::Nvfp4 => fluxm::FluxPrecision::F32,
            other => other,
        },
    };
    let opts = fluxm::ExportOptions {
        precision: prec,
        controlnet: fluxm::ControlNetGraph::Model,
        ..Default::default()
    };
    fluxm::export(&cfg, &ck, &opts, out)?;
    Ok((out.to_path_buf(), cfg, modes))
}

fn aux_precisions(p: &Plan, precision: Precision) -> Result<(DataType, DataType)> {
    if precision == Precision::Fp32 {
        return Ok((DataType::FLOAT, DataType::FLOAT));
    }
    Ok((
        dtype_named(&p.recipe.precision.text_encoders, "text encoder")?,
        dtype_named(&p.recipe.precision.vae, "VAE")?,
    ))
}

/// The f32 calibration transformer (its `amax.*` outputs fold into `model.amax`) with the text encoders and VAE
/// of `aux`, as a pipeline on `backend`; and the transformer's linear layers.
fn calibration_pipeline(
    p: &Plan,
    dir: &Path,
    aux: &OnnxPaths,
    backend: BackendChoice,
) -> Result<(ImagePipeline<FluxModel>, Vec<LinearShape>)> {
    let calib = dir.join("calibration.transformer.onnx");
    let opts = fluxm::ExportOptions {
        calibration: true,
        ..Default::default()
    };
    let report = export_transformer(p, &opts, &calib)?;
    let open = |path: &Path| open_file(&EngineFile::open(path)?, backend, &OpenOptions::default());
    let mut model = FluxModel::new(
        p.config.clone(),
        load_clip_tokenizer(&p.files.clip_tokenizer, p.config.clip_pad)?,
        T5Tokenizer::load(&p.files.t5_tokenizer)?,
        FluxEngines {
            clip: open(&aux.clip)?,
            t5: open(&aux.t5)?,
            transformer: open(&calib)?,
            vae_decoder: open(&aux.vae_decoder)?,
            vae_encoder: None,
            tae_decoder: None,
            controlnet: None,
        },
    );
    model.amax = Some(HashMap::new());
    Ok((ImagePipeline::new(model), report.linears))
}

/// The image side calibration and the quality search run at: at most the profile's optimum size (calibration only
/// needs typical activations).
fn calibration_side(p: &Plan) -> usize {
    let r = &p.recipe.precision;
    (r.calibration_px.min(p.recipe.shapes.image_px[1] as usize) / 16).max(1) * 16
}

/// Runs the calibration prompts through the sampler loop and returns the per-layer activation amax.
fn calibrate(p: &Plan, pipe: &mut ImagePipeline<FluxModel>) -> Result<HashMap<String, f32>> {
    let r = &p.recipe.precision;
    pipe.model.amax = Some(HashMap::new());
    pipe.calibrate(
        &r.calibration_prompts,
        r.calibration_steps,
        calibration_side(p),
        1.0,
    )?;
    let amax = pipe.model.amax.take().unwrap_or_default();
    if amax.is_empty() {
        bail!("the calibration graph reported no activation ranges");
    }
    Ok(amax)
}

/// `--precision auto` / `--policy`: the per-layer formats, searched on the calibration pipeline (whose transformer
/// is the unquantized reference) or read from the policy file; the chosen policy is written to `policy_out`.
fn choose_layers(
    p: &Plan,
    o: &FluxBuildOptions,
    dir: &Path,
    pipe: &mut ImagePipeline<FluxModel>,
    shapes: &[LinearShape],
    amax: &HashMap<String, f32>,
    policy_out: &Path,
) -> Result<BTreeMap<String, Format>> {
    let cand = dir.join("candidate.transformer.onnx");
    let backend = o.calibration_backend;
    let swap = Box::new(
        move |m: &mut FluxModel, layers: &BTreeMap<String, Format>| -> Result<()> {
            export_transformer(p, &layered_options(layers, amax)?, &cand)?;
            m.engines.transformer =
                open_file(&EngineFile::open(&cand)?, backend, &OpenOptions::default())?;
            Ok(())
        },
    );
    pipe.model.amax = None;
    let r = &p.recipe.precision;
    let per_token = 2 * p.config.vae_scale_factor as i64;
    let opt_side = (p.recipe.shapes.image_px[1] / per_token).max(1) as usize;
    let search = auto_precision::ImageSearch {
        arch: &o.arch,
        auto: &o.auto,
        targets: &o.base.targets,
        calibration_prompts: &r.calibration_prompts,
        heldout_prompts: &r.heldout_prompts,
        steps: r.calibration_steps,
        side: calibration_side(p),
        tokens: opt_side * opt_side + p.config.t5_max_len,
        base_bytes: 4,
        policy_out,
    };
    auto_precision::choose_image_layers(&search, pipe, &o.auto.candidates(shapes, None)?, swap)
}

/// Optimization profiles of every component for the recipe's batch and image ranges.
fn profiles(p: &Plan) -> Result<BTreeMap<&'static str, Vec<ShapeRange>>> {
    let s = &p.recipe.shapes;
    let c = &p.config;
    let per_token = (2 * c.vae_scale_factor) as i64;
    let side = |i: usize| (s.image_px[i] / per_token).max(1);
    let b = s.batch;
    let r = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let l = c.t5_max_len as i64;
    let tr = fluxm::profile(&p.transformer, b, s.image_px, l)?;
    let lc = c.latent_channels as i64;
    let lat = |i: usize| 2 * side(i);
    let px = |i: usize| lat(i) * c.vae_scale_factor as i64;
    let mut m = BTreeMap::new();
    m.insert("transformer", tr);
    m.insert("clip", vec![r("input_ids", &|_| vec![1, 77])]);
    m.insert("t5", vec![r("input_ids", &|_| vec![1, l])]);
    // Height and width vary independently between the smallest and largest side.
    m.insert(
        "vae_decoder",
        vec![ShapeRange {
            name: "latent".into(),
            min: vec![b[0], lc, lat(0), lat(0)],
            opt: vec![b[1], lc, lat(1), lat(1)],
            max: vec![b[2], lc, lat(2), lat(2)],
        }],
    );
    m.insert(
        "vae_encoder",
        vec![ShapeRange {
            name: "image".into(),
            min: vec![1, 3, px(0), px(0)],
            opt: vec![1, 3, px(1), px(1)],
            max: vec![1, 3, px(2), px(2)],
        }],
    );
    Ok(m)
}

pub struct FluxBuildOptions {
    pub model: PathBuf,
    pub arch: String,
    pub precision: Precision,
    pub clip_tokenizer: Option<PathBuf>,
    pub t5_tokenizer: Option<PathBuf>,
    /// madebyollin TAE (taef1) decoder for previews.
    pub tae_decoder: Option<PathBuf>,
    pub t5_max_len: Option<usize>,
    /// Image side range (min, opt, max pixels) for the engines' profiles instead of the recipe's.
    pub image_px: Option<[i64; 3]>,
    /// Calibration prompts and steps instead of the recipe's.
    pub calibration_prompts: Option<Vec<String>>,
    pub calibration_steps: Option<usize>,
    /// Backend the FP8 calibration runs on.
    pub calibration_backend: BackendChoice,
    /// LoRA files at strengths, merged into the weights before export and quantization.
    pub loras: Vec<LoraSpec>,
    /// FP8/NVFP4: rank of the LoRA side path beside each quantized layer (0: none).
    pub lora_rank: usize,
    /// A diffusers FluxControlNetModel folder (config.json + safetensors) added to the bundle.
    pub controlnet: Option<PathBuf>,
    /// `--precision auto --quality` / `--policy FILE`: per-layer formats, written to `NAME.policy.toml`.
    pub auto: AutoOptions,
    pub base: BuildOptions,
}

/// Exports, calibrates (FP8), builds every component, and writes the bundle's manifest.
pub fn build_flux(o: &FluxBuildOptions) -> Result<BuildOutcome> {
    let p = plan(
        ModelFiles::find(
            &o.model,
            o.clip_tokenizer.as_deref(),
            o.t5_tokenizer.as_deref(),
        )?,
        &o.arch,
        o.t5_max_len,
    )?
    .with_loras(&open_all(&o.loras)?)?;
    let mut p = p;
    if let Some(v) = &o.calibration_prompts
        && !v.is_empty()
    {
        p.recipe.precision.calibration_prompts = v.clone();
    }
    if let Some(n) = o.calibration_steps {
        p.recipe.precision.calibration_steps = n.max(1);
    }
    if let Some(px) = o.image_px {
        if px.iter().any(|v| *v <= 0 || v % 16 != 0) || px[0] > px[1] || px[1] > px[2] {
            bail!(
                "--image-px {px:?}: three increasing multiples of 16 (min, opt, max side in pixels)"
            );
        }
        p.recipe.shapes.image_px = px;
    }
    let stem = o
        .base
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flux".into());
    let dir = o
        .base
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let paths = OnnxPaths::new(&dir, Some(&stem));
    // All of the bundle's files (`<stem>.*`) or none: an error or a signal removes those this build wrote.
    let guard = crate::fsutil::BundleGuard::watch(&dir, &format!("{stem}."));
    let (text, vae_dt) = aux_precisions(&p, o.precision)?;
    tracing::info!("exporting the text encoders and the VAE");
    // The bundle's ONNX graphs are what the CPU backend runs: f32 compute (ONNX Runtime's CPU provider has no
    // bf16/f16 MatMul). Engines in another precision are built from their own graphs (`<stem>.trt.<c>.onnx`).
    let f32t = DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t)?;
    let trt_paths = if (text, vae_dt) == (f32t, f32t) {
        None
    } else {
        let tp = OnnxPaths::new(&dir, Some(&format!("{stem}.trt")));
        export_aux(&p, &tp, text, vae_dt)?;
        Some(tp)
    };
    let layered = o.auto.per_layer(o.precision)?;
    if (o.precision == Precision::Fp8 || layered)
        && p.config.control_channels + p.config.fill_channels > 0
    {
        bail!(
            "FP8 calibration runs the recipe's prompts without control images or masks, which FLUX.1 Canny/Depth/Fill \
             need; build this model in nvfp4, bf16 or fp16"
        );
    }
    let policy_out = sibling(&o.base.out, ".policy.toml");
    let mut topts = if o.precision == Precision::Fp8 || layered {
        let tmp = tempfile::tempdir_in(&dir).context("cannot create a calibration folder")?;
        let (mut pipe, shapes) =
            calibration_pipeline(&p, tmp.path(), &paths, o.calibration_backend)?;
        let amax = calibrate(&p, &mut pipe)?;
        if layered {
            let layers = choose_layers(&p, o, tmp.path(), &mut pipe, &shapes, &amax, &policy_out)?;
            layered_options(&layers, &amax)?
        } else {
            transformer_options(&p, o.precision, amax)?
        }
    } else {
        transformer_options(&p, o.precision, HashMap::new())?
    };
    tracing::info!("exporting the transformer ({})", o.precision);
    if o.lora_rank > 0 {
        if topts.policy.is_none() {
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
        topts.lora_rank = o.lora_rank;
    }
    let controlnet = match &o.controlnet {
        Some(dir) => {
            let cn = export_controlnet(
                &p,
                dir,
                o.precision,
                &sibling(&o.base.out, ".controlnet.onnx"),
            )?;
            topts.controlnet = fluxm::ControlNetGraph::Residuals {
                double: cn.1.depth,
                single: cn.1.depth_single,
            };
            p.config.controlnet_modes = cn.2;
            Some(cn)
        }
        None => None,
    };
    export_transformer(&p, &topts, &paths.transformer)?;
    let clip_tok = sibling(&o.base.out, ".clip-tokenizer");
    let clip_tok = clip_tok.with_file_name(format!(
        "{}{}",
        file_name(&clip_tok),
        match p.files.clip_tokenizer.extension().and_then(|e| e.to_str()) {
            Some("gz") => ".txt.gz",
            Some("json") => ".json",
            _ => ".txt",
        }
    ));
    let t5_tok = sibling(&o.base.out, ".t5-tokenizer.json");
    for (src, dst) in [
        (&p.files.clip_tokenizer, &clip_tok),
        (&p.files.t5_tokenizer, &t5_tok),
    ] {
        crate::fsutil::copy_atomic(src, dst)?;
    }
    // Tokenizers are checked before any engine is built.
    load_clip_tokenizer(&clip_tok, p.config.clip_pad)?;
    T5Tokenizer::load(&t5_tok)?;
    let src = trt_paths.as_ref().unwrap_or(&paths);
    let mut aux = vec![
        ("clip", paths.clip.clone(), src.clip.clone()),
        ("t5", paths.t5.clone(), src.t5.clone()),
        (
            "vae_decoder",
            paths.vae_decoder.clone(),
            src.vae_decoder.clone(),
        ),
        (
            "vae_encoder",
            paths.vae_encoder.clone(),
            src.vae_encoder.clone(),
        ),
    ];
    if let Some(tae) = &o.tae_decoder {
        let ck = Checkpoint::open(tae)?;
        let cfg = taesd::TaesdConfig::from_checkpoint(&ck, taesd::TaeKind::Decoder)?;
        let out = sibling(&o.base.out, ".tae_decoder.onnx");
        save(
            taesd::graph(&cfg, &ck, DataType::FLOAT)?,
            &out,
            &SaveOptions::default(),
        )?;
        aux.push(("tae_decoder", out.clone(), out));
    }
    let mut profiles = profiles(&p)?;
    if let Some((cn_onnx, cn, modes)) = &controlnet {
        // The ControlNet takes the transformer's inputs plus the packed control latents and the scale; the
        // transformer takes its sample stacks.
        let tr = profiles
            .get_mut("transformer")
            .context("transformer profile")?;
        let hs = tr
            .iter()
            .find(|r| r.name == "hidden_states")
            .cloned()
            .context("hidden_states profile")?;
        let mut cn_shapes: Vec<ShapeRange> = tr.clone();
        cn_shapes.push(ShapeRange {
            name: "controlnet_cond".into(),
            min: vec![hs.min[0], hs.min[1], cn.in_channels as i64],
            opt: vec![hs.opt[0], hs.opt[1], cn.in_channels as i64],
            max: vec![hs.max[0], hs.max[1], cn.in_channels as i64],
        });
        if *modes > 0 {
            cn_shapes.push(ShapeRange {
                name: "controlnet_mode".into(),
                min: vec![hs.min[0]],
                opt: vec![hs.opt[0]],
                max: vec![hs.max[0]],
            });
        }
        cn_shapes.push(ShapeRange {
            name: "conditioning_scale".into(),
            min: vec![1],
            opt: vec![1],
            max: vec![1],
        });
        let d = p.transformer.hidden_size as i64;
        for (name, n) in [
            ("controlnet_block_samples", cn.depth),
            ("controlnet_single_block_samples", cn.depth_single),
        ] {
            if n > 0 {
                let s = |v: &[i64]| vec![n as i64, v[0], v[1], d];
                tr.push(ShapeRange {
                    name: name.into(),
                    min: s(&hs.min),
                    opt: s(&hs.opt),
                    max: s(&hs.max),
                });
            }
        }
        aux.push(("controlnet", cn_onnx.clone(), cn_onnx.clone()));
        profiles.insert("controlnet", cn_shapes);
    }
    let components: Vec<ComponentGraphs> = aux
        .into_iter()
        .map(|(name, cpu_onnx, trt_onnx)| ComponentGraphs {
            shapes: profiles.remove(name).unwrap_or_default(),
            name: name.into(),
            cpu_onnx,
            trt_onnx,
        })
        .collect();
    let transformer = ComponentGraphs {
        name: "transformer".into(),
        cpu_onnx: paths.transformer.clone(),
        trt_onnx: paths.transformer.clone(),
        shapes: profiles.remove("transformer").unwrap_or_default(),
    };
    let bundle = ImageBundle {
        arch: o.arch.clone(),
        precision: if layered { "auto" } else { o.precision.name() }.into(),
        config: serde_json::to_value(&p.config)?,
        components: BTreeMap::new(),
        tokenizers: BTreeMap::from([
            ("clip".to_string(), file_name(&clip_tok)),
            ("t5".to_string(), file_name(&t5_tok)),
        ]),
    };
    let outcome = build_bundle(&o.base, &components, transformer, bundle)?;
    guard.disarm();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_diffusers_folders_and_bfl_single_files() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path();
        for sub in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
            std::fs::create_dir_all(m.join(sub)).unwrap();
        }
        std::fs::write(m.join("tokenizer/merges.txt"), "").unwrap();
        std::fs::write(m.join("tokenizer_2/tokenizer.json"), "").unwrap();
        let e = ModelFiles::find(m, None, None).err().unwrap().to_string();
        assert!(e.contains("transformer/") && e.contains("vae/"), "{e}");
        std::fs::write(m.join("flux1-dev.safetensors"), "").unwrap();
        std::fs::write(m.join("ae.safetensors"), "").unwrap();
        let f = ModelFiles::find(m, None, None).unwrap();
        assert_eq!(f.transformer, m.join("flux1-dev.safetensors"));
        assert_eq!(f.vae, m.join("ae.safetensors"));
        assert_eq!(f.clip_tokenizer, m.join("tokenizer/merges.txt"));
        std::fs::create_dir_all(m.join("transformer")).unwrap();
        assert_eq!(
            ModelFiles::find(m, None, None).unwrap().transformer,
            m.join("transformer")
        );
    }
}
