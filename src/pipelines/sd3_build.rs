//! SD3.5 bundles. `trt-diff build MODEL_DIR --arch sd35-medium|sd35-large|sd35-large-turbo --precision P --out
//! NAME.plan` exports every component of a diffusers-layout StableDiffusion3 folder (transformer/, text_encoder/
//! (CLIP-L), text_encoder_2/ (CLIP-G), text_encoder_3/ (T5-XXL, optional), tokenizer/, tokenizer_3/, vae/,
//! scheduler/) to `NAME.<component>.onnx`, builds a TensorRT engine of each (the transformer's is `NAME.plan`),
//! copies the tokenizers and records the pipeline (scheduler shift, VAE factors, CLIP pads) in `NAME.plan.json`.
//! Without --arch the folder's model_index.json must name a StableDiffusion3 pipeline; the transformer's
//! `dual_attention_layers` tell medium from large, and a folder named `*turbo*` is large-turbo. The recipe
//! (engines/<arch>.toml) gives the defaults, shapes and the precision policy's extra exclusions.
use super::auto_precision::{self, AutoOptions};
use super::bundle::{ComponentGraphs, build_bundle, file_name, sibling};
use super::engines::{OpenOptions, open_file};
use super::image::ImagePipeline;
use super::sd3::{Sd3Engines, Sd3Model, Sd3PipelineConfig, Sd3Tokenizers};
use crate::backend::BackendChoice;
use crate::manifest::{EngineFile, ImageBundle, ShapeRange};
use crate::models::clip::{self, ClipOptions, ClipTextConfig};
use crate::models::flux::FluxPrecision;
use crate::models::{sd3 as sm, t5, vae};
use crate::onnx::{DataType, SaveOptions, save};
use crate::quant::{LinearPrecision, Precision};
use crate::tokenizer::clip::{ClipTokenizer, EOS};
use crate::tokenizer::t5::T5Tokenizer;
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
}
#[derive(Clone, Debug, Deserialize)]
pub struct RecipePrecision {
    pub vae: String,
    /// Layers (diffusers names, globs) kept high precision beyond the family's defaults.
    pub keep: Vec<String>,
    pub calibration_steps: usize,
    pub calibration_px: usize,
    pub calibration_cfg: f32,
    pub calibration_prompts: Vec<String>,
    /// `--precision auto` verifies its choice on these.
    #[serde(default)]
    pub heldout_prompts: Vec<String>,
}

/// An SD3 model's components, resolved: a diffusers folder's subfolders or the parts of a single file.
pub struct ModelFiles {
    pub transformer: Source,
    pub clip_l: Source,
    pub clip_g: Source,
    /// None: the model has no T5 (optional in SD3).
    pub t5: Option<Source>,
    pub vae: Source,
    pub clip_tokenizer: PathBuf,
    pub t5_tokenizer: Option<PathBuf>,
    pub scheduler_config: Option<PathBuf>,
    /// tokenizer/ and tokenizer_2/ (their tokenizer_config.json give the pad tokens), when present.
    pub tokenizer_dirs: [PathBuf; 2],
}

/// Where one component's weights are.
#[derive(Clone, Debug)]
pub enum Source {
    /// A diffusers/transformers folder; its config.json describes the component.
    Folder(PathBuf),
    /// A part of a single-file checkpoint (Stability AI's and ComfyUI's layout) or a text encoder's own file;
    /// `config` is the config.json of `--config`'s diffusers folder, else the config is read off the weights.
    File {
        path: PathBuf,
        part: Part,
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Transformer,
    ClipL,
    ClipG,
    T5,
    Vae,
}

impl Part {
    /// The part's key prefix in a whole-model single file (diffusers' `single_file_utils`).
    fn prefix(self) -> &'static str {
        match self {
            Part::Transformer => "model.diffusion_model.",
            Part::ClipL => "text_encoders.clip_l.transformer.",
            Part::ClipG => "text_encoders.clip_g.transformer.",
            Part::T5 => "text_encoders.t5xxl.transformer.",
            Part::Vae => "first_stage_model.",
        }
    }

    /// The part's subfolder in a diffusers folder.
    fn subfolder(self) -> &'static str {
        match self {
            Part::Transformer => "transformer",
            Part::ClipL => "text_encoder",
            Part::ClipG => "text_encoder_2",
            Part::T5 => "text_encoder_3",
            Part::Vae => "vae",
        }
    }
}

impl Source {
    pub fn path(&self) -> &Path {
        match self {
            Source::Folder(p) | Source::File { path: p, .. } => p,
        }
    }

    /// The config.json describing the component, if there is one.
    pub fn config(&self) -> Option<PathBuf> {
        match self {
            Source::Folder(d) => Some(d.join("config.json")),
            Source::File { config, .. } => config.clone(),
        }
    }

    /// The component's tensors under diffusers/transformers names. Single files are renamed views of the same
    /// mapping; their CLIP-L gets the identity projection (SAI's files have none; diffusers' `from_single_file`
    /// and ComfyUI use CLIP-L's pooled output unprojected).
    pub fn open(&self) -> Result<Checkpoint> {
        use crate::weights::safetensors_file::Derived;
        let (path, part) = match self {
            Source::Folder(d) => return Checkpoint::open(d),
            Source::File { path, part, .. } => (path, *part),
        };
        let ck = Checkpoint::open(path)?;
        match part {
            // The VAE reader finds its prefix and layout itself.
            Part::Vae => Ok(ck),
            Part::Transformer => {
                let prefix = sm::original_prefix(&ck).with_context(|| {
                    format!(
                        "'{}' has no SD3 transformer (no joint_blocks.0.x_block.attn.qkv.weight)",
                        path.display()
                    )
                })?;
                sm::diffusers_view(&ck, &prefix)
            }
            Part::ClipL | Part::ClipG | Part::T5 => {
                let inside = ck.names().any(|n| n.starts_with(part.prefix()));
                let prefix = if inside { part.prefix() } else { "" };
                let mut table: Vec<(String, Derived)> = ck
                    .names()
                    .filter_map(|n| n.strip_prefix(prefix).map(|k| (k.to_string(), n)))
                    .filter(|(k, _)| {
                        !(part == Part::ClipL && k.ends_with("text_projection.weight"))
                    })
                    .map(|(k, n)| (k, Derived::Same(n.to_string())))
                    .collect();
                if part == Part::ClipL {
                    let tok = "embeddings.token_embedding.weight";
                    let d = ck
                        .names()
                        .find(|n| n.starts_with(prefix) && n.ends_with(tok))
                        .and_then(|n| ck.shape(n))
                        .map(|s| s[1])
                        .with_context(|| {
                            format!(
                                "'{}' has no CLIP-L text encoder (no '{tok}')",
                                path.display()
                            )
                        })?;
                    // The identity is sized by the header: bound it (CLIP-L is 768 wide).
                    if d > 4096 {
                        bail!(
                            "'{}': a CLIP-L {d} wide is not a CLIP-L (768); the file is damaged or another model",
                            path.display()
                        );
                    }
                    let mut eye = vec![0f32; d * d];
                    eye.iter_mut().step_by(d + 1).for_each(|v| *v = 1.0);
                    let identity = crate::weights::safetensors_file::Tensor {
                        name: "text_projection.weight".into(),
                        dtype: DataType::FLOAT,
                        shape: vec![d, d],
                        data: bytes::Bytes::from(bytemuck::cast_slice::<f32, u8>(&eye).to_vec()),
                        quant: None,
                    };
                    table.push(("text_projection.weight".into(), Derived::Made(identity)));
                }
                ck.renamed(table)
            }
        }
    }
}

fn model_index_class(path: &Path) -> Option<String> {
    std::fs::read_to_string(path.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["_class_name"].as_str().map(str::to_string))
}

/// Whether `path` is a diffusers SD3 folder (its model_index.json names a StableDiffusion3 pipeline) or an SD3
/// single file (an original-layout MMDiT inside).
pub fn looks_like_sd3(path: &Path) -> bool {
    if path.is_file() {
        return path.extension().is_some_and(|e| e == "safetensors")
            && Checkpoint::open(path).is_ok_and(|ck| sm::original_prefix(&ck).is_some());
    }
    model_index_class(path).is_some_and(|c| c.starts_with("StableDiffusion3"))
}

/// The arch of an SD3 folder or single file: medium when the transformer has MMDiT-X blocks, large-turbo when
/// the name says turbo, else large.
pub fn detect_arch(model: &Path) -> Result<&'static str> {
    let c = if model.is_file() {
        let ck = Checkpoint::open(model)?;
        let prefix = sm::original_prefix(&ck).with_context(|| {
            format!(
                "'{}' is not an SD3 single-file checkpoint (no joint_blocks.0.x_block.attn.qkv.weight)",
                model.display()
            )
        })?;
        sm::Sd3Config::from_checkpoint(&sm::diffusers_view(&ck, &prefix)?)?
    } else {
        let cfg = model.join("transformer/config.json");
        let text = std::fs::read_to_string(&cfg).with_context(|| {
            format!(
                "cannot read '{}': an SD3.5 folder needs transformer/config.json (or pass --arch)",
                cfg.display()
            )
        })?;
        sm::Sd3Config::from_json(&text, &cfg)?
    };
    let name = model
        .canonicalize()
        .unwrap_or_else(|_| model.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    Ok(if c.is_medium() {
        "sd35-medium"
    } else if name.contains("turbo") {
        "sd35-large-turbo"
    } else {
        "sd35-large"
    })
}

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.exists())
}

impl ModelFiles {
    /// Finds the components; tokenizer paths may be given explicitly (folders without tokenizer files).
    /// `config`: a diffusers folder whose component configs describe a single file's parts (as diffusers'
    /// `from_single_file(config=...)`); without it they are read off the weights.
    pub fn find(
        model: &Path,
        clip_tok: Option<&Path>,
        t5_tok: Option<&Path>,
        config: Option<&Path>,
    ) -> Result<Self> {
        if model.is_file() {
            return Self::single_file(model, clip_tok, t5_tok, config);
        }
        if !model.is_dir() {
            bail!(
                "'{}' does not exist: --arch sd35-* builds take a diffusers-layout model folder (transformer/, \
                 text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_3/, vae/, scheduler/) or a \
                 single-file checkpoint (sd3.5_medium.safetensors)",
                model.display()
            );
        }
        if config.is_some() {
            bail!(
                "--config describes the parts of a single-file checkpoint; '{}' is a folder, whose own config.json \
                 files are used: drop --config",
                model.display()
            );
        }
        let mut missing = Vec::new();
        for rel in ["transformer", "text_encoder", "text_encoder_2", "vae"] {
            if !model.join(rel).exists() {
                missing.push(rel.to_string());
            }
        }
        let clip_tokenizer = match clip_tok {
            Some(p) => Some(p.to_path_buf()),
            None => first_existing(&model.join("tokenizer"), &["merges.txt", "tokenizer.json"]),
        };
        if clip_tokenizer.is_none() {
            missing.push(
                "tokenizer/merges.txt or tokenizer/tokenizer.json (or --clip-tokenizer)".into(),
            );
        }
        let t5 = model.join("text_encoder_3");
        let t5 = t5.exists().then_some(t5);
        let t5_tokenizer = match (t5_tok, &t5) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(_)) => {
                let p = first_existing(&model.join("tokenizer_3"), &["tokenizer.json"]);
                if p.is_none() {
                    missing.push("tokenizer_3/tokenizer.json (or --t5-tokenizer)".into());
                }
                p
            }
            (None, None) => None,
        };
        if !missing.is_empty() {
            bail!(
                "'{}' is missing {}: download the whole diffusers folder (e.g. \
                 stabilityai/stable-diffusion-3.5-medium)",
                model.display(),
                missing.join(", ")
            );
        }
        if t5.is_none() {
            tracing::warn!(
                "'{}' has no text_encoder_3: the T5 part of the conditioning is zeros, as diffusers does without \
                 T5 (prompts follow less closely)",
                model.display()
            );
        }
        let scheduler = model.join("scheduler/scheduler_config.json");
        Ok(ModelFiles {
            transformer: Source::Folder(model.join("transformer")),
            clip_l: Source::Folder(model.join("text_encoder")),
            clip_g: Source::Folder(model.join("text_encoder_2")),
            t5: t5.map(Source::Folder),
            vae: Source::Folder(model.join("vae")),
            clip_tokenizer: clip_tokenizer.expect("checked"),
            t5_tokenizer,
            scheduler_config: scheduler.exists().then_some(scheduler),
            tokenizer_dirs: [model.join("tokenizer"), model.join("tokenizer_2")],
        })
    }
}

impl ModelFiles {
    /// A single file with the transformer (`model.diffusion_model.*` or bare `joint_blocks.*`) and the VAE
    /// (`first_stage_model.*`); the text encoders inside it (`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`)
    /// or in their own files beside it, as Stability AI's repositories keep them (`text_encoders/clip_l.safetensors`,
    /// `clip_g.safetensors`, `t5xxl_fp16.safetensors`).
    fn single_file(
        file: &Path,
        clip_tok: Option<&Path>,
        t5_tok: Option<&Path>,
        config: Option<&Path>,
    ) -> Result<Self> {
        let ck = Checkpoint::open(file)?;
        if sm::original_prefix(&ck).is_none() {
            bail!(
                "'{}' is not an SD3 single-file checkpoint: it has no joint_blocks.0.x_block.attn.qkv.weight (the \
                 MMDiT of Stability AI's sd3.5_*.safetensors); for diffusers models point at the folder",
                file.display()
            );
        }
        let part_config = |part: Part| -> Result<Option<PathBuf>> {
            let Some(dir) = config else { return Ok(None) };
            let p = dir.join(part.subfolder()).join("config.json");
            if !p.is_file() {
                bail!(
                    "--config '{}' has no {}/config.json: name a diffusers SD3 folder of the same model",
                    dir.display(),
                    part.subfolder()
                );
            }
            Ok(Some(p))
        };
        let beside = file.parent().unwrap_or(Path::new("."));
        let text_file = |part: Part, names: &[&str]| -> Option<PathBuf> {
            if ck.names().any(|n| n.starts_with(part.prefix())) {
                return Some(file.to_path_buf());
            }
            names.iter().find_map(|n| {
                [beside.join("text_encoders").join(n), beside.join(n)]
                    .into_iter()
                    .find(|p| p.is_file())
            })
        };
        let source = |path: PathBuf, part: Part| -> Result<Source> {
            Ok(Source::File {
                path,
                part,
                config: part_config(part)?,
            })
        };
        let mut missing = Vec::new();
        let clip_l = text_file(Part::ClipL, &["clip_l.safetensors"]);
        let clip_g = text_file(Part::ClipG, &["clip_g.safetensors"]);
        if clip_l.is_none() {
            missing.push("CLIP-L (text_encoders.clip_l.* inside it, or text_encoders/clip_l.safetensors beside it)");
        }
        if clip_g.is_none() {
            missing.push("CLIP-G (text_encoders.clip_g.* inside it, or text_encoders/clip_g.safetensors beside it)");
        }
        if !ck.names().any(|n| n.starts_with(Part::Vae.prefix())) {
            missing.push("the VAE (first_stage_model.*)");
        }
        if !missing.is_empty() {
            bail!(
                "'{}' holds the SD3 transformer but not {}: download them from the model's repository (Stability \
                 AI keeps the text encoders in text_encoders/), or use the diffusers folder",
                file.display(),
                missing.join(", ")
            );
        }
        let t5 = text_file(
            Part::T5,
            &[
                "t5xxl_fp16.safetensors",
                "t5xxl.safetensors",
                "t5xxl_fp32.safetensors",
            ],
        );
        let Some(clip_tokenizer) = clip_tok.map(Path::to_path_buf).or_else(|| {
            config.and_then(|d| {
                first_existing(&d.join("tokenizer"), &["merges.txt", "tokenizer.json"])
            })
        }) else {
            bail!(
                "'{}' is a single-file checkpoint, which holds no tokenizer: pass --clip-tokenizer FILE (CLIP's \
                 merges.txt or bpe_simple_vocab_16e6.txt.gz)",
                file.display()
            );
        };
        let t5_tokenizer = match (&t5, t5_tok) {
            (None, _) => None,
            (Some(_), Some(p)) => Some(p.to_path_buf()),
            (Some(_), None) => match config
                .and_then(|d| first_existing(&d.join("tokenizer_3"), &["tokenizer.json"]))
            {
                Some(p) => Some(p),
                None => bail!(
                    "'{}' comes with T5, whose tokenizer no single file holds: pass --t5-tokenizer FILE (T5's \
                     tokenizer.json)",
                    file.display()
                ),
            },
        };
        if t5.is_none() {
            tracing::warn!(
                "'{}' has no T5 inside or beside it (text_encoders/t5xxl_fp16.safetensors): the T5 part of the \
                 conditioning is zeros, as diffusers does without T5 (prompts follow less closely)",
                file.display()
            );
        }
        let scheduler = config.map(|d| d.join("scheduler/scheduler_config.json"));
        let tokenizer_dir = |sub: &str| config.map_or_else(|| beside.join(sub), |d| d.join(sub));
        Ok(ModelFiles {
            transformer: source(file.to_path_buf(), Part::Transformer)?,
            clip_l: source(clip_l.expect("checked"), Part::ClipL)?,
            clip_g: source(clip_g.expect("checked"), Part::ClipG)?,
            t5: t5.map(|p| source(p, Part::T5)).transpose()?,
            vae: source(file.to_path_buf(), Part::Vae)?,
            clip_tokenizer,
            t5_tokenizer,
            scheduler_config: scheduler.filter(|p| p.exists()),
            tokenizer_dirs: [tokenizer_dir("tokenizer"), tokenizer_dir("tokenizer_2")],
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

/// The pad id of a CLIP tokenizer folder (`pad_token` of tokenizer_config.json or special_tokens_map.json:
/// `<|endoftext|>` or `!`), else `default`.
fn clip_pad(dir: &Path, default: u32) -> Result<u32> {
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(f);
        if !p.exists() {
            continue;
        }
        let v = read_json(&p)?;
        let tok = match &v["pad_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        match tok.as_deref() {
            Some("<|endoftext|>") => return Ok(EOS),
            Some("!") => return Ok(0),
            Some(other) => bail!(
                "'{}' pads with '{other}'; SD3's CLIP tokenizers pad with <|endoftext|> or !",
                p.display()
            ),
            None => {}
        }
    }
    Ok(default)
}

/// Everything an export needs to know, read off the model folder.
pub struct Plan {
    pub files: ModelFiles,
    pub recipe: Recipe,
    pub config: Sd3PipelineConfig,
    pub transformer: sm::Sd3Config,
    pub clip_l: ClipTextConfig,
    pub clip_g: ClipTextConfig,
    pub t5: Option<t5::T5Config>,
    pub vae: vae::VaeConfig,
}

fn clip_config(src: &Source) -> Result<ClipTextConfig> {
    let Some(p) = src.config() else {
        return ClipTextConfig::from_checkpoint(&src.open()?, "", 0);
    };
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot read '{}' (the CLIP text encoder's config)",
            p.display()
        )
    })?;
    ClipTextConfig::from_json(&text).with_context(|| format!("in '{}'", p.display()))
}

pub fn plan(files: ModelFiles, arch: &str) -> Result<Plan> {
    let recipe: Recipe = super::recipe::load(arch)?;
    let tck = files.transformer.open()?;
    let transformer = match files.transformer.config() {
        Some(tpath) => {
            let text = super::bundle::read_transformer_config(&tpath)?;
            sm::Sd3Config::from_json(&text, &tpath)?
        }
        None => sm::Sd3Config::from_checkpoint(&tck)?,
    };
    transformer
        .check_checkpoint(&tck)
        .with_context(|| format!("'{}'", files.transformer.path().display()))?;
    drop(tck);
    let tpath = files.transformer.path();
    if arch == "sd35-medium" && !transformer.is_medium() {
        bail!(
            "--arch sd35-medium, but '{}' has no dual_attention_layers (an SD3.5 large transformer): use --arch \
             sd35-large",
            tpath.display()
        );
    }
    if arch != "sd35-medium" && transformer.is_medium() {
        bail!(
            "--arch {arch}, but '{}' has MMDiT-X dual attention blocks (SD3.5 medium): use --arch sd35-medium",
            tpath.display()
        );
    }
    let clip_l = clip_config(&files.clip_l)?;
    let clip_g = clip_config(&files.clip_g)?;
    let d = &recipe.defaults;
    let t5 = match &files.t5 {
        Some(src) => {
            let c = match src.config() {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read '{}' (T5's config)", p.display()))?;
                    t5::T5Config::from_json(&text, d.max_sequence_length)
                        .with_context(|| format!("in '{}'", p.display()))?
                }
                None => t5::T5Config::from_checkpoint(&src.open()?, d.max_sequence_length)?,
            };
            if c.d_model != transformer.joint_attention_dim {
                bail!(
                    "the model folder's components do not fit together: T5's d_model {} vs the transformer's \
                     joint_attention_dim {} (fix: use the text_encoder_3/ of the same SD3.5 release)",
                    c.d_model,
                    transformer.joint_attention_dim
                );
            }
            Some(c)
        }
        None => None,
    };
    let pooled = |src: &Source, c: &ClipTextConfig| -> Result<usize> {
        let ck = src.open()?;
        let name = ck
            .names()
            .find(|n| n.ends_with("text_projection.weight"))
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "'{}' has no text_projection: SD3 needs CLIPTextModelWithProjection encoders",
                    src.path().display()
                )
            })?;
        Ok(ck.shape(&name).map_or(c.hidden_size, |s| s[0]))
    };
    let pooled_dim = pooled(&files.clip_l, &clip_l)? + pooled(&files.clip_g, &clip_g)?;
    if pooled_dim != transformer.pooled_projection_dim {
        bail!(
            "the model folder's components do not fit together: CLIP-L and CLIP-G project to {pooled_dim} \
             features, the transformer's pooled_projection_dim is {}",
            transformer.pooled_projection_dim
        );
    }
    let vck = files.vae.open()?;
    let mut vae = vae::VaeConfig::from_checkpoint(&vck)?;
    if vae.latent_channels != transformer.in_channels {
        bail!(
            "the model's components do not fit together: the VAE has {} latent channels, the transformer takes {}",
            vae.latent_channels,
            transformer.in_channels
        );
    }
    // SD3's latent factors; a single file without --config has no config to give them.
    let (mut scaling_factor, mut shift_factor) = (1.5305, 0.0609);
    if let Some(vcfg_path) = files.vae.config() {
        let vcfg = read_json(&vcfg_path)?;
        let factor = |key: &str| -> Result<f32> {
            match vcfg.get(key).and_then(|v| v.as_f64()) {
                Some(v) => Ok(v as f32),
                None => bail!(
                    "'{}' has no {key}: SD3's VAE config gives scaling_factor (1.5305) and shift_factor (0.0609)",
                    vcfg_path.display()
                ),
            }
        };
        (scaling_factor, shift_factor) = (factor("scaling_factor")?, factor("shift_factor")?);
        if let Some(g) = vcfg.get("norm_num_groups").and_then(|g| g.as_u64()) {
            vae.norm_num_groups = g as usize;
        }
    }
    let s = match &files.scheduler_config {
        Some(p) => read_json(p)?,
        None => {
            tracing::warn!("no scheduler/scheduler_config.json: SD3.5's shift 3.0 is used");
            serde_json::json!({})
        }
    };
    let num = |key: &str, default: f64| s.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
    let config = Sd3PipelineConfig {
        arch: arch.to_string(),
        latent_channels: vae.latent_channels,
        vae_scale_factor: 1 << (vae.block_out_channels.len().max(1) - 1),
        scaling_factor,
        shift_factor,
        patch_size: transformer.patch_size,
        pos_embed_max_size: transformer.pos_embed_max_size,
        num_layers: transformer.num_layers,
        joint_attention_dim: transformer.joint_attention_dim,
        shift: num("shift", 3.0) as f32,
        dynamic_shift: s
            .get("use_dynamic_shifting")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        base_image_seq_len: num("base_image_seq_len", 256.0),
        max_image_seq_len: num("max_image_seq_len", 4096.0),
        base_shift: num("base_shift", 0.5),
        max_shift: num("max_shift", 1.15),
        clip_pads: [
            clip_pad(&files.tokenizer_dirs[0], EOS)?,
            clip_pad(&files.tokenizer_dirs[1], 0)?,
        ],
        max_sequence_length: d.max_sequence_length,
        default_steps: d.steps,
        default_sampler: d.sampler.clone(),
        default_scheduler: d.scheduler.clone(),
        default_width: d.width,
        default_height: d.height,
        default_cfg: d.cfg,
    };
    ClipTokenizer::load(&files.clip_tokenizer)?;
    if let Some(t) = &files.t5_tokenizer {
        T5Tokenizer::load(t)?;
    }
    Ok(Plan {
        files,
        recipe,
        config,
        transformer,
        clip_l,
        clip_g,
        t5,
        vae,
    })
}

impl Plan {
    /// The tokenizers the pipeline runs with.
    pub fn tokenizers(&self) -> Result<Sd3Tokenizers> {
        let clip = |pad: u32| -> Result<ClipTokenizer> {
            let mut t = ClipTokenizer::load(&self.files.clip_tokenizer)?;
            t.pad = pad;
            Ok(t)
        };
        Ok(Sd3Tokenizers {
            clip_l: clip(self.config.clip_pads[0])?,
            clip_g: clip(self.config.clip_pads[1])?,
            t5: match &self.files.t5_tokenizer {
                Some(p) if self.t5.is_some() => Some(T5Tokenizer::load(p)?),
                _ => None,
            },
        })
    }
}

/// Where each component's ONNX goes.
pub struct OnnxPaths {
    pub transformer: PathBuf,
    pub clip_l: PathBuf,
    pub clip_g: PathBuf,
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
            clip_l: p("clip_l"),
            clip_g: p("clip_g"),
            t5: p("t5"),
            vae_decoder: p("vae_decoder"),
            vae_encoder: p("vae_encoder"),
        }
    }

    fn all(&self) -> [&PathBuf; 6] {
        [
            &self.transformer,
            &self.clip_l,
            &self.clip_g,
            &self.t5,
            &self.vae_decoder,
            &self.vae_encoder,
        ]
    }
}

/// Writes the text encoders (CLIP in `text`, T5 in `text` or bf16 where `text` is f16: T5 overflows in f16) and
/// the VAE halves in `vae_dt`.
pub fn export_aux(p: &Plan, paths: &OnnxPaths, text: DataType, vae_dt: DataType) -> Result<()> {
    let opts = ClipOptions {
        scope: String::new(),
        penultimate: true,
        projection: true,
    };
    for (src, cfg, out) in [
        (&p.files.clip_l, &p.clip_l, &paths.clip_l),
        (&p.files.clip_g, &p.clip_g, &paths.clip_g),
    ] {
        let ck = src.open()?;
        clip::export_with(cfg, &ck, text, &opts, out)
            .with_context(|| format!("exporting the text encoder of '{}'", src.path().display()))?;
    }
    if let (Some(src), Some(cfg)) = (&p.files.t5, &p.t5) {
        let ck = src.open()?;
        let dt = if text == DataType::FLOAT16 {
            DataType::BFLOAT16
        } else {
            text
        };
        t5::export(cfg, &ck, dt, &paths.t5)?;
    }
    let ck = p.files.vae.open()?;
    let so = SaveOptions::default();
    save(
        vae::graph(&p.vae, &ck, vae::VaePart::Decoder, vae_dt)?,
        &paths.vae_decoder,
        &so,
    )?;
    save(
        vae::graph(&p.vae, &ck, vae::VaePart::Encoder, vae_dt)?,
        &paths.vae_encoder,
        &so,
    )?;
    Ok(())
}

/// The transformer graph, streamed to `out`.
pub fn export_transformer(
    p: &Plan,
    opts: &sm::ExportOptions,
    out: &Path,
) -> Result<crate::models::flux::LinearsReport> {
    sm::export(&p.transformer, &p.files.transformer.open()?, opts, out)
}

/// The transformer's export options for a build precision: the family's policy plus the recipe's exclusions.
pub fn transformer_options(
    p: &Plan,
    precision: Precision,
    amax: HashMap<String, f32>,
) -> Result<sm::ExportOptions> {
    let prec = FluxPrecision::from_precision(precision).map_err(|_| {
        anyhow::anyhow!(
            "--precision {precision} is not available for SD3.5: use fp32, fp16, bf16, fp8 or nvfp4"
        )
    })?;
    let policy = match prec {
        FluxPrecision::Fp8 => Some(LinearPrecision::Fp8),
        FluxPrecision::Nvfp4 => Some(LinearPrecision::Nvfp4),
        _ => None,
    }
    .map(|t| sm::default_policy(t).with_overrides(&[], &p.recipe.precision.keep))
    .transpose()?;
    Ok(sm::ExportOptions {
        precision: prec,
        policy,
        amax,
        ..Default::default()
    })
}

/// The text encoders' compute type in the TensorRT graphs for a build precision (the CPU graphs are f32).
fn text_dtype(precision: Precision) -> DataType {
    match precision {
        Precision::Fp32 => DataType::FLOAT,
        Precision::Bf16 => DataType::BFLOAT16,
        _ => DataType::FLOAT16,
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

/// Opens f32 graphs of `paths` (with `transformer` instead of the bundle's) as a pipeline on `backend`.
pub fn open_model(
    p: &Plan,
    paths: &OnnxPaths,
    transformer: &Path,
    backend: BackendChoice,
) -> Result<Sd3Model> {
    let open = |path: &Path| open_file(&EngineFile::open(path)?, backend, &OpenOptions::default());
    Ok(Sd3Model::new(
        p.config.clone(),
        p.tokenizers()?,
        Sd3Engines {
            clip_l: open(&paths.clip_l)?,
            clip_g: open(&paths.clip_g)?,
            t5: match p.t5 {
                Some(_) => Some(open(&paths.t5)?),
                None => None,
            },
            transformer: open(transformer)?,
            vae_decoder: open(&paths.vae_decoder)?,
            vae_encoder: paths
                .vae_encoder
                .exists()
                .then(|| open(&paths.vae_encoder))
                .transpose()?,
        },
    ))
}

/// The image side (pixels) calibration and the quality search run at: at most the profile's optimum.
fn calibration_side(p: &Plan) -> usize {
    let r = &p.recipe.precision;
    let m = p.config.patch_size * p.config.vae_scale_factor;
    (r.calibration_px.min(p.recipe.shapes.image_px[1] as usize) / m).max(1) * m
}

/// The transformer's export options for the build: FP8's activation scales calibrated through the sampler loop
/// (with the recipe's CFG, so both prompt branches are seen) on an f32 calibration graph; with `--precision auto`
/// or `--policy`, per-layer formats searched on that same pipeline (or read from the policy file).
fn calibrated_options(
    p: &Plan,
    o: &Sd3BuildOptions,
    dir: &Path,
    aux: &OnnxPaths,
) -> Result<sm::ExportOptions> {
    let layered = o.auto.per_layer(o.precision)?;
    if o.precision != Precision::Fp8 && !layered {
        return transformer_options(p, o.precision, HashMap::new());
    }
    let tmp = tempfile::tempdir_in(dir).context("cannot create a calibration folder")?;
    let calib = tmp.path().join("calibration.transformer.onnx");
    let opts = sm::ExportOptions {
        calibration: true,
        ..Default::default()
    };
    let shapes = export_transformer(p, &opts, &calib)?.shapes;
    let backend = o.calibration_backend;
    let mut model = open_model(p, aux, &calib, backend)?;
    model.amax = Some(HashMap::new());
    let mut pipe = ImagePipeline::new(model);
    let r = &p.recipe.precision;
    pipe.calibrate(
        &r.calibration_prompts,
        r.calibration_steps,
        calibration_side(p),
        r.calibration_cfg,
    )?;
    let amax = pipe.model.amax.take().unwrap_or_default();
    if amax.is_empty() {
        bail!("the calibration graph reported no activation ranges");
    }
    if !layered {
        return transformer_options(p, Precision::Fp8, amax);
    }
    // The family's exclusions and the recipe's `keep` stay high in every engine, so they are not measured.
    let keep = sm::default_policy(LinearPrecision::Fp8).with_overrides(&[], &r.keep)?;
    let cand = tmp.path().join("candidate.transformer.onnx");
    let measured_amax = amax.clone();
    let swap = move |m: &mut Sd3Model, precision, policy| -> Result<()> {
        let opts = sm::ExportOptions {
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
    let opt_side =
        (p.recipe.shapes.image_px[1] as usize / (c.patch_size * c.vae_scale_factor)).max(1);
    let search = auto_precision::ImageSearch {
        arch: &c.arch,
        auto: &o.auto,
        targets: &o.base.targets,
        calibration_prompts: &r.calibration_prompts,
        heldout_prompts: &r.heldout_prompts,
        steps: r.calibration_steps,
        side: calibration_side(p),
        tokens: opt_side * opt_side + p.recipe.defaults.max_sequence_length,
        base_bytes: 4,
        policy_out: &sibling(&o.base.out, ".policy.toml"),
    };
    pipe.model.amax = None;
    let (precision, policy) =
        auto_precision::choose_dit_layers(&search, &mut pipe, &shapes, &keep, swap)?;
    Ok(sm::ExportOptions {
        precision,
        policy,
        amax,
        ..Default::default()
    })
}

/// Optimization profiles of every component for the recipe's batch and image ranges (CFG doubles the
/// transformer's batch).
fn profiles(p: &Plan) -> BTreeMap<&'static str, Vec<ShapeRange>> {
    let s = &p.recipe.shapes;
    let c = &p.config;
    let vs = c.vae_scale_factor as i64;
    let m = (c.patch_size as i64) * vs;
    let lat = |i: usize| (s.image_px[i] / m).max(1) * m / vs;
    let b = s.batch;
    let tb = [b[0], 2 * b[1], 2 * b[2]];
    let r = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let lc = c.latent_channels as i64;
    let seq = (crate::tokenizer::clip::MAX_LEN + c.max_sequence_length) as i64;
    let (jd, pd) = (
        c.joint_attention_dim as i64,
        p.transformer.pooled_projection_dim as i64,
    );
    let mut out = BTreeMap::new();
    out.insert(
        "transformer",
        vec![
            r("latents", &|i| vec![tb[i], lc, lat(i), lat(i)]),
            r("timestep", &|i| vec![tb[i]]),
            r("encoder_hidden_states", &|i| vec![tb[i], seq, jd]),
            r("pooled_projections", &|i| vec![tb[i], pd]),
        ],
    );
    for name in ["clip_l", "clip_g"] {
        out.insert(name, vec![r("input_ids", &|_| vec![1, 77])]);
    }
    let l = c.max_sequence_length as i64;
    out.insert("t5", vec![r("input_ids", &|_| vec![1, l])]);
    out.insert(
        "vae_decoder",
        vec![r("latent", &|i| vec![b[i], lc, lat(i), lat(i)])],
    );
    out.insert(
        "vae_encoder",
        vec![r("image", &|i| vec![1, 3, lat(i) * vs, lat(i) * vs])],
    );
    out
}

/// `trt-diff export MODEL --arch sd35-* --out DIR`: one ONNX graph per component (f32 unless `precision` says
/// otherwise; FP8 needs a calibration and is only made by `build`).
pub fn export_sd3(
    model: &Path,
    arch: &str,
    precision: Precision,
    out_dir: &Path,
    clip_tok: Option<&Path>,
    t5_tok: Option<&Path>,
    config: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let p = plan(ModelFiles::find(model, clip_tok, t5_tok, config)?, arch)?;
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
    for f in paths.all() {
        guard.add(f);
        guard.add(f.with_file_name(format!("{}.data", file_name(f))));
    }
    export_aux(&p, &paths, text_dtype(precision), vae_dtype(&p, precision)?)?;
    export_transformer(
        &p,
        &transformer_options(&p, precision, HashMap::new())?,
        &paths.transformer,
    )?;
    guard.disarm();
    Ok(paths
        .all()
        .into_iter()
        .filter(|f| f.exists())
        .cloned()
        .collect())
}

pub struct Sd3BuildOptions {
    pub model: PathBuf,
    /// None: read off the folder ([`detect_arch`]).
    pub arch: Option<String>,
    pub precision: Precision,
    pub clip_tokenizer: Option<PathBuf>,
    pub t5_tokenizer: Option<PathBuf>,
    /// Single files: a diffusers folder describing their parts ([`ModelFiles::find`]).
    pub config: Option<PathBuf>,
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
pub fn build_sd3(o: &Sd3BuildOptions) -> Result<BuildOutcome> {
    let arch = match &o.arch {
        Some(a) => a.clone(),
        None => detect_arch(&o.model)?.to_string(),
    };
    let files = ModelFiles::find(
        &o.model,
        o.clip_tokenizer.as_deref(),
        o.t5_tokenizer.as_deref(),
        o.config.as_deref(),
    )?;
    let mut p = plan(files, &arch)?;
    if let Some(v) = &o.calibration_prompts
        && !v.is_empty()
    {
        p.recipe.precision.calibration_prompts = v.clone();
    }
    if let Some(n) = o.calibration_steps {
        p.recipe.precision.calibration_steps = n.max(1);
    }
    let m = (p.config.patch_size * p.config.vae_scale_factor) as i64;
    if let Some(px) = o.image_px {
        if px.iter().any(|v| *v <= 0 || v % m != 0) || px[0] > px[1] || px[1] > px[2] {
            bail!(
                "--image-px {px:?}: three increasing multiples of {m} (min, opt, max side in pixels)"
            );
        }
        p.recipe.shapes.image_px = px;
    }
    // The position table covers pos_embed_max_size patches a side: larger profiles cannot run.
    let max_px =
        (p.config.pos_embed_max_size * p.config.patch_size * p.config.vae_scale_factor) as i64;
    let px = &mut p.recipe.shapes.image_px;
    if o.image_px.is_some() && px[2] > max_px {
        bail!(
            "--image-px {px:?}: this transformer's position table (pos_embed_max_size {}) covers images up to \
             {max_px} pixels a side; lower the maximum",
            p.config.pos_embed_max_size
        );
    }
    if px[2] > max_px {
        tracing::warn!(
            "the recipe's image sizes {px:?} exceed this transformer's {max_px} pixels a side; the engines' \
             profiles stop there"
        );
        *px = px.map(|v| v.min(max_px));
    }
    let stem = o
        .base
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sd35".into());
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
    tracing::info!("exporting the text encoders and the VAE");
    // The bundle's ONNX graphs are what the CPU backend runs (f32); engines in another precision are built from
    // their own graphs (`<stem>.trt.<c>.onnx`).
    let f32t = DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t)?;
    let (text, vae_dt) = (text_dtype(o.precision), vae_dtype(&p, o.precision)?);
    let trt_paths = if (text, vae_dt) == (f32t, f32t) {
        None
    } else {
        let tp = OnnxPaths::new(&dir, Some(&format!("{stem}.trt")));
        export_aux(&p, &tp, text, vae_dt)?;
        Some(tp)
    };
    let topts = calibrated_options(&p, o, &dir, &paths)?;
    tracing::info!("exporting the transformer ({})", o.precision);
    export_transformer(&p, &topts, &paths.transformer)?;
    let mut tokenizers = BTreeMap::new();
    let ext = if file_name(&p.files.clip_tokenizer).ends_with(".json") {
        ".json"
    } else if file_name(&p.files.clip_tokenizer).ends_with(".gz") {
        ".txt.gz"
    } else {
        ".txt"
    };
    let clip_tok = sibling(&o.base.out, &format!(".clip-tokenizer{ext}"));
    crate::fsutil::copy_atomic(&p.files.clip_tokenizer, &clip_tok)?;
    ClipTokenizer::load(&clip_tok)?;
    tokenizers.insert("clip".to_string(), file_name(&clip_tok));
    if let (Some(src), Some(_)) = (&p.files.t5_tokenizer, &p.t5) {
        let t5_tok = sibling(&o.base.out, ".t5-tokenizer.json");
        crate::fsutil::copy_atomic(src, &t5_tok)?;
        T5Tokenizer::load(&t5_tok)?;
        tokenizers.insert("t5".to_string(), file_name(&t5_tok));
    }
    let src = trt_paths.as_ref().unwrap_or(&paths);
    let mut profiles = profiles(&p);
    let mut parts = vec![
        ("clip_l", &paths.clip_l, &src.clip_l),
        ("clip_g", &paths.clip_g, &src.clip_g),
    ];
    if p.t5.is_some() {
        parts.push(("t5", &paths.t5, &src.t5));
    }
    parts.push(("vae_decoder", &paths.vae_decoder, &src.vae_decoder));
    parts.push(("vae_encoder", &paths.vae_encoder, &src.vae_encoder));
    let components: Vec<ComponentGraphs> = parts
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
        arch: arch.clone(),
        precision: o.precision.name().into(),
        config: serde_json::to_value(&p.config)?,
        components: BTreeMap::new(),
        tokenizers,
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
        let e = ModelFiles::find(d.path(), None, None, None)
            .err()
            .unwrap()
            .to_string();
        for part in [
            "text_encoder,",
            "text_encoder_2",
            "vae",
            "tokenizer/merges.txt",
        ] {
            assert!(e.contains(part), "{e}");
        }
        assert!(!e.contains("transformer,"), "{e}");
        assert!(!looks_like_sd3(d.path()));
        let file = d.path().join("sd3.5_medium.safetensors");
        std::fs::write(&file, b"").unwrap();
        let e = ModelFiles::find(&file, None, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a readable safetensors"), "{e}");
        std::fs::write(
            d.path().join("model_index.json"),
            r#"{"_class_name": "StableDiffusion3Pipeline"}"#,
        )
        .unwrap();
        assert!(looks_like_sd3(d.path()));
    }

    #[test]
    fn clip_pads_come_from_the_tokenizer_folders() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(clip_pad(d.path(), 7).unwrap(), 7);
        std::fs::write(
            d.path().join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!"}}"#,
        )
        .unwrap();
        assert_eq!(clip_pad(d.path(), EOS).unwrap(), 0);
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"pad_token": "<pad>"}"#,
        )
        .unwrap();
        let e = clip_pad(d.path(), 0).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("<pad>"),
            "{e}"
        );
    }
}
