//! Z-Image bundles. `trt-diff build MODEL_DIR --arch z-image-turbo --precision P --out NAME.plan` exports every
//! component of a diffusers-layout Z-Image folder (transformer/, text_encoder/ (Qwen3), tokenizer/, vae/,
//! scheduler/) to `NAME.<component>.onnx`, builds a TensorRT engine of each (the transformer's is `NAME.plan`),
//! copies the tokenizer and records the pipeline (scheduler shift, VAE scaling, chat template) in `NAME.plan.json`.
//! The text encoder is the LLM decoder graph (`models::llama::encoder_graph`) cut after its second-to-last layer.
//! The recipe (engines/z-image-turbo.toml) gives the defaults, shapes and the precision policy's extra exclusions.
use super::auto_precision::{self, AutoOptions};
use super::bundle::{ComponentGraphs, build_bundle, file_name, sibling};
use super::engines::{OpenOptions, open_file};
use super::image::ImagePipeline;
use super::z_image::{ZImageEngines, ZImageModel, ZImagePipelineConfig};
use crate::backend::BackendChoice;
use crate::manifest::{EngineFile, ImageBundle, ShapeRange};
use crate::models::flux::FluxPrecision;
use crate::models::{llama, vae, z_image as zm};
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
    pub arch: String,
    pub defaults: RecipeDefaults,
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
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipeShapes {
    pub batch: [i64; 3],
    pub image_px: [i64; 3],
    /// Prompt tokens (with the chat template) for the text encoder and the transformer's caption.
    pub text_len: [i64; 3],
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

/// A diffusers-layout Z-Image folder, resolved.
pub struct ModelFiles {
    pub transformer: PathBuf,
    pub text_encoder: PathBuf,
    pub vae: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub scheduler_config: Option<PathBuf>,
}

/// Whether `path` is a diffusers Z-Image folder (its model_index.json names a ZImage pipeline).
pub fn looks_like_z_image(path: &Path) -> bool {
    std::fs::read_to_string(path.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["_class_name"].as_str().map(|s| s.starts_with("ZImage")))
        .unwrap_or(false)
}

impl ModelFiles {
    pub fn find(model: &Path) -> Result<Self> {
        if !model.is_dir() {
            bail!(
                "'{}' is not a folder: --arch z-image-turbo builds take a diffusers-layout model folder \
                 (transformer/, text_encoder/, tokenizer/, vae/, scheduler/)",
                model.display()
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
        let files = ModelFiles {
            transformer: need("transformer"),
            text_encoder: need("text_encoder"),
            vae: need("vae"),
            tokenizer: need("tokenizer/tokenizer.json"),
            tokenizer_dir: model.join("tokenizer"),
            scheduler_config: None,
        };
        if !missing.is_empty() {
            bail!(
                "'{}' is missing {}: download the whole diffusers folder (e.g. Tongyi-MAI/Z-Image-Turbo)",
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
/// `chat_template`; ChatML when neither has one (Qwen3's template renders one user turn the same way).
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

/// Everything an export needs to know, read off the model folder.
pub struct Plan {
    pub files: ModelFiles,
    pub recipe: Recipe,
    pub config: ZImagePipelineConfig,
    pub transformer: zm::ZImageConfig,
    pub vae: vae::VaeConfig,
}

pub fn plan(files: ModelFiles, arch: &str) -> Result<Plan> {
    let recipe: Recipe = super::recipe::load(arch)?;
    let tpath = files.transformer.join("config.json");
    let text = super::bundle::read_transformer_config(&tpath)?;
    let transformer = zm::ZImageConfig::from_json(&text, &tpath)?;
    zm::ZImageConfig::check_checkpoint(&transformer, &Checkpoint::open(&files.transformer)?)
        .with_context(|| format!("'{}'", files.transformer.display()))?;
    let (te_arch, te) = crate::weights::hf::config(
        &files.text_encoder,
        Some(recipe.defaults.max_sequence_length),
    )?;
    if te_arch != "qwen3" {
        bail!(
            "'{}' is a {te_arch} model; Z-Image's text encoder is Qwen3 (model_type \"qwen3\")",
            files.text_encoder.join("config.json").display()
        );
    }
    if te.dim != transformer.cap_feat_dim || te.n_layers < 2 {
        bail!(
            "the model folder's components do not fit together: the text encoder's hidden size {} (and {} layers) \
             vs the transformer's cap_feat_dim {} (fix: use the text_encoder/ of the same Z-Image release)",
            te.dim,
            te.n_layers,
            transformer.cap_feat_dim
        );
    }
    let vck = Checkpoint::open(&files.vae)?;
    let vae = vae::VaeConfig::from_checkpoint(&vck)?;
    if vae.latent_channels != transformer.in_channels {
        bail!(
            "the model folder's components do not fit together: the VAE has {} latent channels, the transformer \
             takes {}",
            vae.latent_channels,
            transformer.in_channels
        );
    }
    let vcfg_path = files.vae.join("config.json");
    let vcfg = read_json(&vcfg_path)?;
    let factor = |key: &str| -> Result<f32> {
        match vcfg.get(key).and_then(|v| v.as_f64()) {
            Some(v) => Ok(v as f32),
            None => bail!(
                "'{}' has no {key}: Z-Image's VAE config gives scaling_factor and shift_factor",
                vcfg_path.display()
            ),
        }
    };
    let s = match &files.scheduler_config {
        Some(p) => read_json(p)?,
        None => {
            tracing::warn!("no scheduler/scheduler_config.json: Z-Image-Turbo's shift 3.0 is used");
            serde_json::json!({})
        }
    };
    let num = |key: &str, default: f64| s.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
    let d = &recipe.defaults;
    let config = ZImagePipelineConfig {
        arch: arch.to_string(),
        latent_channels: vae.latent_channels,
        vae_scale_factor: 1 << (vae.block_out_channels.len().max(1) - 1),
        scaling_factor: factor("scaling_factor")?,
        shift_factor: factor("shift_factor")?,
        shift: num("shift", 3.0) as f32,
        dynamic_shift: s
            .get("use_dynamic_shifting")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        base_image_seq_len: num("base_image_seq_len", 256.0),
        max_image_seq_len: num("max_image_seq_len", 4096.0),
        base_shift: num("base_shift", 0.5),
        max_shift: num("max_shift", 1.15),
        max_sequence_length: d.max_sequence_length,
        chat_template: chat_template(&files.tokenizer_dir)?,
        default_steps: d.steps,
        default_sampler: d.sampler.clone(),
        default_scheduler: d.scheduler.clone(),
        default_width: d.width,
        default_height: d.height,
        default_cfg: d.cfg,
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

/// Writes the text encoder (its linear layers at `text`, the LLM graph's precisions) and the VAE halves.
pub fn export_aux(
    p: &Plan,
    paths: &OnnxPaths,
    text: LinearPrecision,
    vae_dt: DataType,
) -> Result<()> {
    let hf = crate::weights::hf::load(&p.files.text_encoder, Some(p.config.max_sequence_length))?;
    let policy = match text {
        LinearPrecision::F32 | LinearPrecision::F16 => Policy::uniform(text),
        quantized => Policy::defaults(quantized),
    };
    let layers = hf.config.n_layers - 1;
    let g = llama::encoder_graph(&hf.config, &hf.tensors, &policy, layers)?;
    drop(hf);
    save(g, &paths.text_encoder, &SaveOptions::default())?;
    let opts = SaveOptions::default();
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
    opts: &zm::ExportOptions,
    out: &Path,
) -> Result<crate::models::flux::LinearsReport> {
    let ck = Checkpoint::open(&p.files.transformer)?;
    zm::export(&p.transformer, &ck, opts, out)
}

fn transformer_options(
    p: &Plan,
    precision: Precision,
    amax: HashMap<String, f32>,
) -> Result<zm::ExportOptions> {
    let prec = FluxPrecision::from_precision(precision)
        .map_err(|_| anyhow::anyhow!("--precision {precision} is not available for Z-Image: use fp32, fp16, bf16, fp8 or nvfp4"))?;
    let policy = match prec {
        FluxPrecision::Fp8 => Some(LinearPrecision::Fp8),
        FluxPrecision::Nvfp4 => Some(LinearPrecision::Nvfp4),
        _ => None,
    }
    .map(|t| zm::default_policy(t).with_overrides(&[], &p.recipe.precision.keep))
    .transpose()?;
    Ok(zm::ExportOptions {
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
            "engines/{}.toml: VAE precision '{other}' is not one of fp32, bf16, fp16",
            p.config.arch
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
/// on an f32 calibration graph; with `--precision auto` or `--policy`, per-layer formats searched on that
/// same pipeline (or read from the policy file).
fn calibrated_options(
    p: &Plan,
    o: &ZImageBuildOptions,
    dir: &Path,
    aux: &OnnxPaths,
) -> Result<zm::ExportOptions> {
    let layered = o.auto.per_layer(o.precision)?;
    if o.precision != Precision::Fp8 && !layered {
        return transformer_options(p, o.precision, HashMap::new());
    }
    let tmp = tempfile::tempdir_in(dir).context("cannot create a calibration folder")?;
    let calib = tmp.path().join("calibration.transformer.onnx");
    let opts = zm::ExportOptions {
        calibration: true,
        ..Default::default()
    };
    let shapes = export_transformer(p, &opts, &calib)?.shapes;
    let backend = o.calibration_backend;
    let open = |path: &Path| open_file(&EngineFile::open(path)?, backend, &OpenOptions::default());
    let mut model = ZImageModel::new(
        p.config.clone(),
        QwenTokenizer::load(&p.files.tokenizer)?,
        ZImageEngines {
            text_encoder: open(&aux.text_encoder)?,
            transformer: open(&calib)?,
            vae_decoder: open(&aux.vae_decoder)?,
            vae_encoder: None,
        },
    );
    model.amax = Some(HashMap::new());
    let mut pipe = ImagePipeline::new(model);
    let r = &p.recipe.precision;
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
    if !layered {
        return transformer_options(p, Precision::Fp8, amax);
    }
    // The family's exclusions and the recipe's `keep` stay high in every engine, so they are not measured.
    let keep = zm::default_policy(LinearPrecision::Fp8).with_overrides(&[], &r.keep)?;
    let cand = tmp.path().join("candidate.transformer.onnx");
    let measured_amax = amax.clone();
    let swap = move |m: &mut ZImageModel, precision, policy| -> Result<()> {
        let opts = zm::ExportOptions {
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
    Ok(zm::ExportOptions {
        precision,
        policy,
        amax,
        ..Default::default()
    })
}

/// Optimization profiles of every component for the recipe's batch, image and prompt ranges.
fn profiles(p: &Plan) -> BTreeMap<&'static str, Vec<ShapeRange>> {
    let s = &p.recipe.shapes;
    let c = &p.config;
    let vs = c.vae_scale_factor as i64;
    let lat = |i: usize| (s.image_px[i] / (2 * vs)).max(1) * 2;
    let pad = |n: i64| (n as usize).next_multiple_of(zm::SEQ_MULTI_OF) as i64;
    let (b, t) = (s.batch, s.text_len);
    let r = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let (lc, cd) = (c.latent_channels as i64, p.transformer.cap_feat_dim as i64);
    let mut m = BTreeMap::new();
    m.insert(
        "transformer",
        vec![
            r("latents", &|i| vec![b[i], lc, lat(i), lat(i)]),
            r("timestep", &|i| vec![b[i]]),
            r("cap_feats", &|i| vec![b[i], t[i], cd]),
            r("img_ids", &|i| vec![pad(lat(i) * lat(i) / 4), 3]),
            r("txt_ids", &|i| vec![pad(t[i]), 3]),
        ],
    );
    m.insert("text_encoder", vec![r("input_ids", &|i| vec![1, t[i]])]);
    m.insert(
        "vae_decoder",
        vec![r("latent", &|i| vec![b[i], lc, lat(i), lat(i)])],
    );
    m.insert(
        "vae_encoder",
        vec![r("image", &|i| vec![1, 3, lat(i) * vs, lat(i) * vs])],
    );
    m
}

/// `trt-diff export MODEL --arch z-image-turbo --out DIR`: one ONNX graph per component (f32 unless `precision`
/// says otherwise; FP8 needs a calibration and is only made by `build`).
pub fn export_z_image(
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

pub struct ZImageBuildOptions {
    pub model: PathBuf,
    pub arch: String,
    pub precision: Precision,
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
pub fn build_z_image(o: &ZImageBuildOptions) -> Result<BuildOutcome> {
    let mut p = plan(ModelFiles::find(&o.model)?, &o.arch)?;
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
    let stem = o
        .base
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "z-image".into());
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
    let components: Vec<ComponentGraphs> = [
        ("text_encoder", &paths.text_encoder, &src.text_encoder),
        ("vae_decoder", &paths.vae_decoder, &src.vae_decoder),
        ("vae_encoder", &paths.vae_encoder, &src.vae_encoder),
    ]
    .into_iter()
    .map(|(name, cpu, trt)| ComponentGraphs {
        shapes: profiles.remove(name).unwrap_or_default(),
        name: name.into(),
        cpu_onnx: cpu.clone(),
        trt_onnx: trt.clone(),
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
        assert!(!e.contains("transformer,"), "{e}");
        assert!(!looks_like_z_image(d.path()));
    }
}
