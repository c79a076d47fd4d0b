//! FLUX.2 [klein] bundles. `trt-diff build MODEL_DIR --arch flux2-klein-4b|flux2-klein-9b --precision P --out
//! NAME.plan` (or no --arch: model_index.json names Flux2KleinPipeline) exports every component of a diffusers-layout
//! FLUX.2 [klein] folder (transformer/, text_encoder/ (Qwen3), tokenizer/, vae/ (AutoencoderKLFlux2), scheduler/) to
//! `NAME.<component>.onnx`, builds a TensorRT engine of each (the transformer's is `NAME.plan`), copies the tokenizer
//! and records the pipeline (distilled or base, batch-norm statistics, schedule, chat template) in `NAME.plan.json`.
//! The text encoder is the LLM decoder graph (`models::llama::encoder_graph_opts`) returning layers 9, 18 and 27.
//! `--tae-decoder taef2_decoder.safetensors` adds the preview decoder. The recipe (engines/flux2-klein.toml, shared by
//! both sizes) gives the defaults, shapes and the precision policy's extra exclusions.
use super::auto_precision::{self, AutoOptions};
use super::bundle::{ComponentGraphs, build_bundle, file_name, sibling};
use super::engines::{OpenOptions, open_file};
use super::flux2::{Flux2Engines, Flux2Model, Flux2PipelineConfig};
use super::image::ImagePipeline;
use crate::backend::BackendChoice;
use crate::manifest::{EngineFile, ImageBundle, ShapeRange};
use crate::models::flux::FluxPrecision;
use crate::models::{flux2 as fm, llama, taesd, vae};
use crate::onnx::{DataType, SaveOptions, save};
use crate::quant::policy::Policy;
use crate::quant::{LinearPrecision, Precision};
use crate::tokenizer::qwen::QwenTokenizer;
use crate::trt::{BuildOptions, BuildOutcome};
use crate::weights::safetensors_file::Checkpoint;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize)]
pub struct Recipe {
    pub defaults: RecipeDefaults,
    /// The base (undistilled) models' step count and guidance.
    pub base: RecipeBase,
    pub shapes: RecipeShapes,
    pub precision: RecipePrecision,
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeDefaults {
    pub steps: usize,
    pub sampler: String,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub cfg: f32,
    pub max_sequence_length: usize,
    pub text_layers: Vec<usize>,
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeBase {
    pub steps: usize,
    pub cfg: f32,
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeShapes {
    pub batch: [i64; 3],
    pub image_px: [i64; 3],
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipePrecision {
    pub vae: String,
    /// Layers (diffusers names, globs) kept high precision beyond the family's defaults.
    pub keep: Vec<String>,
    pub calibration_steps: usize,
    pub calibration_px: usize,
    pub calibration_prompts: Vec<String>,
    /// `--precision auto` verifies its choice on these.
    #[serde(default)]
    pub heldout_prompts: Vec<String>,
}

/// A diffusers-layout FLUX.2 [klein] folder, resolved.
pub struct ModelFiles {
    pub root: PathBuf,
    pub transformer: PathBuf,
    pub text_encoder: PathBuf,
    pub vae: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub scheduler_config: Option<PathBuf>,
}

fn model_index(path: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(path.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

/// Whether `path` is a diffusers FLUX.2 folder (its model_index.json names a Flux2 pipeline).
pub fn looks_like_flux2(path: &Path) -> bool {
    model_index(path)
        .and_then(|v| v["_class_name"].as_str().map(|s| s.starts_with("Flux2")))
        .unwrap_or(false)
}

/// The arch of a FLUX.2 [klein] folder: 9B conditions on Qwen3-8B (hidden size 4096), 4B on Qwen3-4B.
pub fn detect_arch(path: &Path) -> &'static str {
    let hidden = std::fs::read_to_string(path.join("text_encoder/config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["hidden_size"].as_u64());
    if hidden == Some(4096) {
        "flux2-klein-9b"
    } else {
        "flux2-klein-4b"
    }
}

impl ModelFiles {
    pub fn find(model: &Path) -> Result<Self> {
        if !model.is_dir() {
            bail!(
                "'{}' is not a folder: FLUX.2 [klein] builds take a diffusers-layout model folder (transformer/, \
                 text_encoder/, tokenizer/, vae/, scheduler/)",
                model.display()
            );
        }
        if let Some(c) =
            model_index(model).and_then(|v| v["_class_name"].as_str().map(String::from))
            && c.starts_with("Flux2")
            && !c.starts_with("Flux2Klein")
        {
            bail!(
                "'{}' is a {c} (FLUX.2 [dev], Mistral text encoder); trt-diff builds FLUX.2 [klein] \
                 (Flux2KleinPipeline) folders",
                model.join("model_index.json").display()
            );
        }
        let mut missing = Vec::new();
        let mut need = |rel: &str| {
            let p = model.join(rel);
            if !p.exists() {
                missing.push(rel.to_string());
            }
            p
        };
        // Black Forest Labs' transformer file at the folder's root (flux-2-klein-4b.safetensors, as their
        // repositories ship it beside the diffusers folders) stands in for transformer/.
        let bfl = crate::fsutil::safetensors_named(model, "flux-2-")?;
        let transformer = match bfl {
            Some(f) if !model.join("transformer").is_dir() => f,
            _ => need("transformer"),
        };
        let files = ModelFiles {
            root: model.to_path_buf(),
            transformer,
            text_encoder: need("text_encoder"),
            vae: need("vae"),
            tokenizer: need("tokenizer/tokenizer.json"),
            tokenizer_dir: model.join("tokenizer"),
            scheduler_config: None,
        };
        if !missing.is_empty() {
            bail!(
                "'{}' is missing {}: download the whole diffusers folder (e.g. black-forest-labs/FLUX.2-klein-4B)",
                model.display(),
                missing.join(", ")
            );
        }
        let scheduler = model.join("scheduler/scheduler_config.json");
        Ok(ModelFiles {
            scheduler_config: scheduler.exists().then_some(scheduler),
            ..files
        })
    }
}

/// The transformer's tensors under diffusers' names: a transformer/ folder as it is, a BFL file renamed.
fn open_transformer(path: &Path) -> Result<Checkpoint> {
    let ck = Checkpoint::open(path)?;
    if !path.is_file() {
        return Ok(ck);
    }
    let prefix = fm::bfl_prefix(&ck).with_context(|| {
        format!(
            "'{}' is not a Black Forest Labs FLUX.2 transformer (no double_blocks.0.img_attn.qkv.weight and \
             single_stream_modulation.lin.weight)",
            path.display()
        )
    })?;
    fm::diffusers_view(&ck, &prefix)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read '{}' (the component's diffusers/transformers config)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("'{}' is not valid JSON", path.display()))
}

/// The tokenizer's chat template: `chat_template.jinja` (transformers 5) or `tokenizer_config.json`'s
/// `chat_template`; ChatML when neither has one.
fn chat_template(dir: &Path) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .with_context(|| format!("cannot read '{}'", jinja.display()));
    }
    let cfg = dir.join("tokenizer_config.json");
    if cfg.exists()
        && let Some(t) = read_json(&cfg)?["chat_template"].as_str()
    {
        return Ok(t.to_string());
    }
    tracing::warn!(
        "'{}' has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); using ChatML",
        dir.display()
    );
    Ok(super::chat::CHATML.to_string())
}

/// The padding token's id: tokenizer_config.json's `pad_token` (Qwen3's `<|endoftext|>` when it names none).
fn pad_token_id(files: &ModelFiles) -> Result<u32> {
    let cfg = files.tokenizer_dir.join("tokenizer_config.json");
    let name = if cfg.exists() {
        let v = read_json(&cfg)?;
        match &v["pad_token"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or("<|endoftext|>")
                .to_string(),
            _ => "<|endoftext|>".to_string(),
        }
    } else {
        "<|endoftext|>".to_string()
    };
    let tok = QwenTokenizer::load(&files.tokenizer)?;
    tok.token_id(&name).with_context(|| {
        format!(
            "the padding token '{name}' ({}) is not in '{}': use the tokenizer/ of the same FLUX.2 [klein] release",
            cfg.display(),
            files.tokenizer.display()
        )
    })
}

/// Everything an export needs to know, read off the model folder.
pub struct Plan {
    pub files: ModelFiles,
    pub recipe: Recipe,
    pub config: Flux2PipelineConfig,
    pub transformer: fm::Flux2Config,
    pub vae: vae::VaeConfig,
}

pub fn plan(files: ModelFiles, arch: &str) -> Result<Plan> {
    let recipe: Recipe = super::recipe::load(arch)?;
    let tck = open_transformer(&files.transformer)?;
    let transformer = if files.transformer.is_file() {
        fm::Flux2Config::from_checkpoint(&tck)?
    } else {
        let tpath = files.transformer.join("config.json");
        let text = super::bundle::read_transformer_config(&tpath)?;
        fm::Flux2Config::from_json(&text, &tpath)?
    };
    transformer
        .check_checkpoint(&tck)
        .with_context(|| format!("'{}'", files.transformer.display()))?;
    drop(tck);
    let d = &recipe.defaults;
    let (te_arch, te) =
        crate::weights::hf::config(&files.text_encoder, Some(d.max_sequence_length))?;
    if te_arch != "qwen3" {
        bail!(
            "'{}' is a {te_arch} model; FLUX.2 [klein]'s text encoder is Qwen3 (model_type \"qwen3\")",
            files.text_encoder.join("config.json").display()
        );
    }
    let layers = &d.text_layers;
    if layers.iter().any(|&l| l == 0 || l > te.n_layers)
        || te.dim * layers.len() != transformer.joint_attention_dim
    {
        bail!(
            "the model folder's components do not fit together: the text encoder's hidden states {layers:?} of \
             {} layers x {} features vs the transformer's joint_attention_dim {} (fix: use the text_encoder/ of the \
             same FLUX.2 [klein] release)",
            te.n_layers,
            te.dim,
            transformer.joint_attention_dim
        );
    }
    let vck = Checkpoint::open(&files.vae)?;
    let vae = vae::VaeConfig::from_checkpoint(&vck)?;
    let ch = vae.latent_channels;
    if 4 * ch != transformer.in_channels || transformer.out_channels() != transformer.in_channels {
        bail!(
            "the model folder's components do not fit together: the VAE has {ch} latent channels (2x2 patches: {}), \
             the transformer takes {} and returns {}",
            4 * ch,
            transformer.in_channels,
            transformer.out_channels()
        );
    }
    let vcfg_path = files.vae.join("config.json");
    let vcfg = read_json(&vcfg_path)?;
    let eps = vcfg["batch_norm_eps"].as_f64().unwrap_or(1e-4) as f32;
    let stat = |key: &str| -> Result<Vec<f32>> {
        let name = format!("{}bn.{key}", vae.prefix);
        let t = vck.get(&name).with_context(|| {
            format!(
                "'{}' has no '{name}': FLUX.2's VAE (AutoencoderKLFlux2) carries the latents' batch-norm \
                 statistics; use the vae/ of a FLUX.2 [klein] folder",
                files.vae.display()
            )
        })?;
        let v = t.to_f32()?;
        if v.len() != 4 * ch {
            bail!(
                "'{name}' has {} values, {} expected (the patchified latent channels)",
                v.len(),
                4 * ch
            );
        }
        Ok(v)
    };
    let bn_mean = stat("running_mean")?;
    let bn_std: Vec<f32> = stat("running_var")?
        .into_iter()
        .map(|v| (v + eps).sqrt())
        .collect();
    let s = match &files.scheduler_config {
        Some(p) => read_json(p)?,
        None => {
            tracing::warn!(
                "no scheduler/scheduler_config.json: FLUX.2 [klein]'s dynamic exponential shift is used"
            );
            serde_json::json!({})
        }
    };
    let dynamic_shift = s
        .get("use_dynamic_shifting")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    if dynamic_shift
        && let Some(t) = s.get("time_shift_type").and_then(|v| v.as_str())
        && t != "exponential"
    {
        bail!(
            "'{}': time_shift_type \"{t}\" is not supported (FLUX.2 [klein]'s is \"exponential\")",
            files
                .scheduler_config
                .as_deref()
                .unwrap_or(Path::new("scheduler_config.json"))
                .display()
        );
    }
    let distilled = model_index(&files.root)
        .and_then(|v| v["is_distilled"].as_bool())
        .unwrap_or_else(|| {
            tracing::warn!(
                "model_index.json gives no is_distilled: treating the model as the distilled FLUX.2 [klein]"
            );
            true
        });
    let (steps, cfg) = if distilled {
        (d.steps, d.cfg)
    } else {
        (recipe.base.steps, recipe.base.cfg)
    };
    let config = Flux2PipelineConfig {
        arch: arch.to_string(),
        distilled,
        latent_channels: ch,
        vae_scale_factor: 1 << (vae.block_out_channels.len().max(1) - 1),
        bn_mean,
        bn_std,
        dynamic_shift,
        shift: s.get("shift").and_then(|v| v.as_f64()).unwrap_or(3.0) as f32,
        text_layers: layers.clone(),
        max_sequence_length: d.max_sequence_length,
        pad_token_id: pad_token_id(&files)?,
        chat_template: chat_template(&files.tokenizer_dir)?,
        default_steps: steps,
        default_sampler: d.sampler.clone(),
        default_scheduler: d.scheduler.clone(),
        default_width: d.width,
        default_height: d.height,
        default_cfg: cfg,
    };
    QwenTokenizer::load(&files.tokenizer)?;
    Ok(Plan {
        files,
        recipe,
        config,
        transformer,
        vae,
    })
}

/// Where each component's ONNX goes.
pub struct OnnxPaths {
    pub transformer: PathBuf,
    pub text_encoder: PathBuf,
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
            text_encoder: p("text_encoder"),
            vae_decoder: p("vae_decoder"),
            vae_encoder: p("vae_encoder"),
        }
    }
}

/// The Qwen3 text encoder graph (its linear layers at `text`): `input_ids` and `attention_mask` [1, seq] in,
/// the recipe's hidden states side by side out.
pub fn text_encoder_graph(
    p: &Plan,
    text: LinearPrecision,
) -> Result<crate::onnx::proto::ModelProto> {
    let hf = crate::weights::hf::load(&p.files.text_encoder, Some(p.config.max_sequence_length))?;
    let policy = match text {
        LinearPrecision::F32 | LinearPrecision::F16 => Policy::uniform(text),
        quantized => Policy::defaults(quantized),
    };
    llama::encoder_graph_opts(
        &hf.config,
        &hf.tensors,
        &llama::EncoderOptions {
            policy: &policy,
            taps: &p.config.text_layers,
            attention_mask: true,
        },
    )
}

/// Writes the text encoder and the VAE halves.
pub fn export_aux(
    p: &Plan,
    paths: &OnnxPaths,
    text: LinearPrecision,
    vae_dt: DataType,
) -> Result<()> {
    let opts = SaveOptions::default();
    save(text_encoder_graph(p, text)?, &paths.text_encoder, &opts)?;
    let ck = Checkpoint::open(&p.files.vae)?;
    save(
        vae::graph(&p.vae, &ck, vae::VaePart::Decoder, vae_dt)?,
        &paths.vae_decoder,
        &opts,
    )?;
    save(
        vae::graph(&p.vae, &ck, vae::VaePart::Encoder, vae_dt)?,
        &paths.vae_encoder,
        &opts,
    )?;
    Ok(())
}

/// The transformer graph, streamed to `out`.
pub fn export_transformer(
    p: &Plan,
    opts: &fm::ExportOptions,
    out: &Path,
) -> Result<crate::models::flux::LinearsReport> {
    fm::export(
        &p.transformer,
        &open_transformer(&p.files.transformer)?,
        opts,
        out,
    )
}

fn transformer_options(
    p: &Plan,
    precision: Precision,
    amax: HashMap<String, f32>,
) -> Result<fm::ExportOptions> {
    let prec = FluxPrecision::from_precision(precision).map_err(|_| {
        anyhow::anyhow!(
            "--precision {precision} is not available for FLUX.2: use fp32, fp16, bf16, fp8 or nvfp4"
        )
    })?;
    let policy = match prec {
        FluxPrecision::Fp8 => Some(LinearPrecision::Fp8),
        FluxPrecision::Nvfp4 => Some(LinearPrecision::Nvfp4),
        _ => None,
    }
    .map(|t| fm::default_policy(t).with_overrides(&[], &p.recipe.precision.keep))
    .transpose()?;
    Ok(fm::ExportOptions {
        precision: prec,
        policy,
        amax,
        ..Default::default()
    })
}

/// The text encoder's linear precision in the TensorRT graph for a build precision (the CPU graph is f32).
fn text_precision(precision: Precision) -> LinearPrecision {
    match precision {
        Precision::Fp8 => LinearPrecision::Fp8,
        Precision::Nvfp4 => LinearPrecision::Nvfp4,
        Precision::Fp16 | Precision::Bf16 | Precision::Auto => LinearPrecision::F16,
        _ => LinearPrecision::F32,
    }
}

fn vae_dtype(p: &Plan, precision: Precision) -> Result<DataType> {
    if precision == Precision::Fp32 {
        return Ok(DataType::FLOAT);
    }
    Ok(match p.recipe.precision.vae.as_str() {
        "fp32" | "f32" => DataType::FLOAT,
        "bf16" => DataType::BFLOAT16,
        "fp16" | "f16" => DataType::FLOAT16,
        other => bail!(
            "engines/flux2-klein.toml: VAE precision '{other}' is not one of fp32, bf16, fp16"
        ),
    })
}

/// The image side (pixels) calibration and the quality search run at: at most the profile's optimum.
fn calibration_side(p: &Plan) -> usize {
    let r = &p.recipe.precision;
    let m = 2 * p.config.vae_scale_factor;
    (r.calibration_px.min(p.recipe.shapes.image_px[1] as usize) / m).max(1) * m
}

/// The transformer's export options for the build: FP8's activation scales calibrated through the sampler loop
/// (with the model's own guidance) on an f32 calibration graph; with `--precision auto` or `--policy`, per-layer formats searched on that
/// same pipeline (or read from the policy file).
fn calibrated_options(
    p: &Plan,
    o: &Flux2BuildOptions,
    dir: &Path,
    aux: &OnnxPaths,
) -> Result<fm::ExportOptions> {
    let layered = o.auto.per_layer(o.precision)?;
    if o.precision != Precision::Fp8 && !layered {
        return transformer_options(p, o.precision, HashMap::new());
    }
    let tmp = tempfile::tempdir_in(dir).context("cannot create a calibration folder")?;
    let calib = tmp.path().join("calibration.transformer.onnx");
    let opts = fm::ExportOptions {
        calibration: true,
        ..Default::default()
    };
    let shapes = export_transformer(p, &opts, &calib)?.shapes;
    let backend = o.calibration_backend;
    let open = |path: &Path| open_file(&EngineFile::open(path)?, backend, &OpenOptions::default());
    let mut model = Flux2Model::new(
        p.config.clone(),
        QwenTokenizer::load(&p.files.tokenizer)?,
        Flux2Engines {
            text_encoder: open(&aux.text_encoder)?,
            transformer: open(&calib)?,
            vae_decoder: open(&aux.vae_decoder)?,
            vae_encoder: None,
            tae_decoder: None,
        },
    );
    model.amax = Some(HashMap::new());
    let mut pipe = ImagePipeline::new(model);
    let r = &p.recipe.precision;
    pipe.calibrate(
        &r.calibration_prompts,
        r.calibration_steps,
        calibration_side(p),
        p.config.default_cfg,
    )?;
    let amax = pipe.model.amax.take().unwrap_or_default();
    if amax.is_empty() {
        bail!("the calibration graph reported no activation ranges");
    }
    if !layered {
        return transformer_options(p, Precision::Fp8, amax);
    }
    // The family's exclusions and the recipe's `keep` stay high in every engine, so they are not measured.
    let keep = fm::default_policy(LinearPrecision::Fp8).with_overrides(&[], &r.keep)?;
    let cand = tmp.path().join("candidate.transformer.onnx");
    let measured_amax = amax.clone();
    let swap = move |m: &mut Flux2Model, precision, policy| -> Result<()> {
        let opts = fm::ExportOptions {
            precision,
            policy,
            amax: measured_amax.clone(),
            ..Default::default()
        };
        export_transformer(p, &opts, &cand)?;
        m.engines.transformer =
            open_file(&EngineFile::open(&cand)?, backend, &OpenOptions::default())?;
        Ok(())
    };
    let c = &p.config;
    let opt_side = (p.recipe.shapes.image_px[1] as usize / (2 * c.vae_scale_factor)).max(1);
    let search = auto_precision::ImageSearch {
        arch: &c.arch,
        auto: &o.auto,
        targets: &o.base.targets,
        calibration_prompts: &r.calibration_prompts,
        heldout_prompts: &r.heldout_prompts,
        steps: r.calibration_steps,
        side: calibration_side(p),
        tokens: opt_side * opt_side + c.max_sequence_length,
        base_bytes: 4,
        policy_out: &sibling(&o.base.out, ".policy.toml"),
    };
    pipe.model.amax = None;
    let (precision, policy) =
        auto_precision::choose_dit_layers(&search, &mut pipe, &shapes, &keep, swap)?;
    Ok(fm::ExportOptions {
        precision,
        policy,
        amax,
        ..Default::default()
    })
}

/// Optimization profiles of every component for the recipe's batch and image ranges (prompts are always padded
/// to `max_sequence_length` tokens).
fn profiles(p: &Plan) -> BTreeMap<&'static str, Vec<ShapeRange>> {
    let s = &p.recipe.shapes;
    let c = &p.config;
    let m = 2 * c.vae_scale_factor as i64;
    // Patched latent side (tokens per side) of each profile point.
    let side = |i: usize| (s.image_px[i] / m).max(1);
    let b = s.batch;
    let t = c.max_sequence_length as i64;
    let r = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let (pc, lc) = (4 * c.latent_channels as i64, c.latent_channels as i64);
    let jd = p.transformer.joint_attention_dim as i64;
    // The largest profile also fits one reference image's tokens (`--control`: up to 1024^2 pixels, as the
    // pipeline scales them, and no larger than the largest image).
    let refs = (s.image_px[2].min(1024) / m).pow(2);
    let tokens = |i: usize| side(i) * side(i) + if i == 2 { refs } else { 0 };
    // Base models run CFG's two predictions as one call of twice the batch.
    let tb = if c.distilled { b } else { b.map(|v| 2 * v) };
    let mut map = BTreeMap::new();
    map.insert(
        "transformer",
        vec![
            r("hidden_states", &|i| vec![tb[i], tokens(i), pc]),
            r("encoder_hidden_states", &|i| vec![tb[i], t, jd]),
            r("timestep", &|i| vec![tb[i]]),
            r("img_ids", &|i| vec![tokens(i), 4]),
            r("txt_ids", &|_| vec![t, 4]),
        ],
    );
    map.insert(
        "text_encoder",
        vec![
            r("input_ids", &|_| vec![1, t]),
            r("attention_mask", &|_| vec![1, t]),
        ],
    );
    map.insert(
        "vae_decoder",
        vec![r("latent", &|i| vec![b[i], lc, 2 * side(i), 2 * side(i)])],
    );
    map.insert(
        "vae_encoder",
        vec![r("image", &|i| vec![1, 3, side(i) * m, side(i) * m])],
    );
    map.insert(
        "tae_decoder",
        vec![r("latent", &|i| vec![1, lc, 2 * side(i), 2 * side(i)])],
    );
    map
}

/// `trt-diff export MODEL --arch flux2-klein-4b --out DIR`: one ONNX graph per component (f32 unless `precision`
/// says otherwise; FP8 needs a calibration and is only made by `build`).
pub fn export_flux2(
    model: &Path,
    arch: &str,
    precision: Precision,
    out_dir: &Path,
) -> Result<OnnxPaths> {
    let p = plan(ModelFiles::find(model)?, arch)?;
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
        &paths.text_encoder,
        &paths.vae_decoder,
        &paths.vae_encoder,
    ] {
        guard.add(f);
        guard.add(f.with_file_name(format!("{}.data", file_name(f))));
    }
    export_aux(
        &p,
        &paths,
        text_precision(precision),
        vae_dtype(&p, precision)?,
    )?;
    export_transformer(
        &p,
        &transformer_options(&p, precision, HashMap::new())?,
        &paths.transformer,
    )?;
    guard.disarm();
    Ok(paths)
}

pub struct Flux2BuildOptions {
    pub model: PathBuf,
    /// None: read off the folder ([`detect_arch`]).
    pub arch: Option<String>,
    pub precision: Precision,
    /// taef2's decoder (`taef2_decoder.safetensors`) for previews.
    pub tae_decoder: Option<PathBuf>,
    /// Image side range (min, opt, max pixels) for the engines' profiles instead of the recipe's.
    pub image_px: Option<[i64; 3]>,
    /// Calibration prompts and steps instead of the recipe's.
    pub calibration_prompts: Option<Vec<String>>,
    pub calibration_steps: Option<usize>,
    /// Backend the FP8 calibration runs on.
    pub calibration_backend: BackendChoice,
    /// `--precision auto` / `--policy`.
    pub auto: AutoOptions,
    pub base: BuildOptions,
}

/// Exports, calibrates (FP8), builds every component, and writes the bundle's manifest.
pub fn build_flux2(o: &Flux2BuildOptions) -> Result<BuildOutcome> {
    let detected = detect_arch(&o.model);
    let arch = o.arch.clone().unwrap_or_else(|| detected.to_string());
    if arch != detected {
        // Both sizes share the code and the recipe; the name only labels the bundle.
        tracing::warn!(
            "--arch {arch}, but '{}' looks like {detected} (its text encoder's width); building it as {arch}",
            o.model.display()
        );
    }
    let mut p = plan(ModelFiles::find(&o.model)?, &arch)?;
    if let Some(v) = &o.calibration_prompts
        && !v.is_empty()
    {
        p.recipe.precision.calibration_prompts = v.clone();
    }
    if let Some(n) = o.calibration_steps {
        p.recipe.precision.calibration_steps = n.max(1);
    }
    let m = (2 * p.config.vae_scale_factor) as i64;
    if let Some(px) = o.image_px {
        if px.iter().any(|v| *v <= 0 || v % m != 0) || px[0] > px[1] || px[1] > px[2] {
            bail!(
                "--image-px {px:?}: three increasing multiples of {m} (min, opt, max side in pixels)"
            );
        }
        p.recipe.shapes.image_px = px;
    }
    let tae = match &o.tae_decoder {
        Some(path) => {
            let ck = Checkpoint::open(path)?;
            let cfg = taesd::TaesdConfig::from_checkpoint(&ck, taesd::TaeKind::Decoder)?;
            if cfg.latent_channels != p.config.latent_channels {
                bail!(
                    "--tae-decoder '{}' decodes {}-channel latents; FLUX.2's VAE has {} (use taef2_decoder.safetensors)",
                    path.display(),
                    cfg.latent_channels,
                    p.config.latent_channels
                );
            }
            Some(taesd::graph(&cfg, &ck, DataType::FLOAT)?)
        }
        None => None,
    };
    let stem = o
        .base
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flux2".into());
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
    tracing::info!("exporting the text encoder and the VAE");
    // The bundle's ONNX graphs are what the CPU backend runs (f32); engines in another precision are built from
    // their own graphs (`<stem>.trt.<c>.onnx`).
    let f32t = DataType::FLOAT;
    export_aux(&p, &paths, LinearPrecision::F32, f32t)?;
    let (text, vae_dt) = (text_precision(o.precision), vae_dtype(&p, o.precision)?);
    let trt_paths = if (text, vae_dt) == (LinearPrecision::F32, f32t) {
        None
    } else {
        let tp = OnnxPaths::new(&dir, Some(&format!("{stem}.trt")));
        export_aux(&p, &tp, text, vae_dt)?;
        Some(tp)
    };
    let topts = calibrated_options(&p, o, &dir, &paths)?;
    tracing::info!("exporting the transformer ({})", o.precision);
    export_transformer(&p, &topts, &paths.transformer)?;
    let tok = sibling(&o.base.out, ".qwen-tokenizer.json");
    crate::fsutil::copy_atomic(&p.files.tokenizer, &tok)?;
    QwenTokenizer::load(&tok)?;
    let src = trt_paths.as_ref().unwrap_or(&paths);
    let mut profiles = profiles(&p);
    let mut graphs = vec![
        (
            "text_encoder",
            paths.text_encoder.clone(),
            src.text_encoder.clone(),
        ),
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
    if let Some(g) = tae {
        let out = dir.join(format!("{stem}.tae_decoder.onnx"));
        save(g, &out, &SaveOptions::default())?;
        graphs.push(("tae_decoder", out.clone(), out));
    }
    let components: Vec<ComponentGraphs> = graphs
        .into_iter()
        .map(|(name, cpu, trt)| ComponentGraphs {
            shapes: profiles.remove(name).unwrap_or_default(),
            name: name.into(),
            cpu_onnx: cpu,
            trt_onnx: trt,
        })
        .collect();
    let transformer = ComponentGraphs {
        name: "transformer".into(),
        cpu_onnx: paths.transformer.clone(),
        trt_onnx: paths.transformer.clone(),
        shapes: profiles.remove("transformer").unwrap_or_default(),
    };
    let bundle = ImageBundle {
        arch,
        precision: o.precision.name().into(),
        config: serde_json::to_value(&p.config)?,
        components: BTreeMap::new(),
        tokenizers: BTreeMap::from([("qwen".to_string(), file_name(&tok))]),
    };
    let outcome = build_bundle(&o.base, &components, transformer, bundle)?;
    guard.disarm();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_components_are_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("transformer")).unwrap();
        let e = ModelFiles::find(d.path()).err().unwrap().to_string();
        for part in ["text_encoder", "vae", "tokenizer/tokenizer.json"] {
            assert!(e.contains(part), "{e}");
        }
        assert!(!looks_like_flux2(d.path()));
        std::fs::write(
            d.path().join("model_index.json"),
            r#"{"_class_name": "Flux2Pipeline"}"#,
        )
        .unwrap();
        assert!(looks_like_flux2(d.path()));
        let e = ModelFiles::find(d.path()).err().unwrap().to_string();
        assert!(e.contains("FLUX.2 [dev]"), "{e}");
        assert_eq!(detect_arch(d.path()), "flux2-klein-4b");
        std::fs::create_dir_all(d.path().join("text_encoder")).unwrap();
        std::fs::write(
            d.path().join("text_encoder/config.json"),
            r#"{"hidden_size": 4096}"#,
        )
        .unwrap();
        assert_eq!(detect_arch(d.path()), "flux2-klein-9b");
    }
}
