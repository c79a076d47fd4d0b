//! The engine file: a standard TensorRT plan (loadable by trtexec, Triton, ...) plus a JSON sidecar manifest
//! `<plan>.json` that says what the plan holds and how it was made. This module is the file's schema and nothing
//! else: it imports no model, pipeline or runtime code. [`EngineFile::open`] reads it once; everything below the
//! command that opened it receives that value.
use crate::fsutil::{AtomicFile, human_bytes, xxh3_file};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

pub const FORMAT: &str = "trt-diff.engine/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub created: String,
    pub created_by: String,
    /// The TensorRT plan, its library and build settings; absent in an ONNX-only bundle (`build --onnx-only`),
    /// which ONNX Runtime runs (CUDA or CPU) on machines without TensorRT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorrt: Option<TensorRtInfo>,
    pub io: Vec<IoTensor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<BuilderInfo>,
    pub source: SourceInfo,
    /// Set when the plan is a whole pipeline's engine (e.g. an LLM decoder with its tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
}

/// The two TensorRT flavours trt-diff drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// TensorRT-RTX 1.x: RTX 30/40/50, DGX Spark GB10, A100; its builder also runs without a GPU.
    Rtx,
    /// TensorRT 11: data-center GPUs (Hopper, Blackwell).
    Trt11,
}

/// min/opt/max dimensions for one input of an optimization profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeRange {
    pub name: String,
    pub min: Vec<i64>,
    pub opt: Vec<i64>,
    pub max: Vec<i64>,
}

impl std::fmt::Display for ShapeRange {
    /// `MIN:OPT:MAX`, dimensions joined by `x` (as `--shapes` takes them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |d: &[i64]| d.iter().map(i64::to_string).collect::<Vec<_>>().join("x");
        write!(
            f,
            "{}:{}:{}",
            join(&self.min),
            join(&self.opt),
            join(&self.max)
        )
    }
}

/// What `generate` needs beyond the plan, with files named relative to the manifest. Family-specific settings
/// (`config`) are JSON that the family's own module reads; the schema does not know the families.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Pipeline {
    Llm(LlmPipeline),
    /// An image bundle: the plan is the denoiser's engine; the other components sit beside it.
    Image(ImageBundle),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlmPipeline {
    pub arch: String,
    /// The decoder's hyper-parameters (`models::llama::LlamaConfig`).
    pub config: serde_json::Value,
    pub tokenizer: String,
    pub precision: String,
    /// A graph for ONNX Runtime on the CPU (16-bit weights through trt-diff's own operator), beside the plan;
    /// the CPU backend runs it instead of the TensorRT graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_onnx: Option<String>,
    /// A graph for ONNX Runtime's CUDA provider (flash attention, the KV cache in place on the GPU; fp16 builds),
    /// beside the plan; `--backend cuda` runs it instead of the TensorRT graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_onnx: Option<String>,
}

/// One component's files, relative to the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleComponent {
    pub onnx: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageBundle {
    /// "flux-dev", "flux-schnell", ...: which pipeline family runs the bundle.
    pub arch: String,
    pub precision: String,
    /// The family's pipeline settings and defaults (e.g. `pipelines::flux::FluxPipelineConfig`).
    pub config: serde_json::Value,
    /// Component name (transformer, clip, t5, vae_decoder, ...) -> files.
    pub components: BTreeMap<String, BundleComponent>,
    /// Tokenizer name (clip, t5, ...) -> file.
    pub tokenizers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlanInfo {
    /// File name of the plan, relative to the manifest.
    pub file: String,
    pub bytes: u64,
    pub xxh3_128: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorRtInfo {
    pub flavor: Flavor,
    /// Version of the library that built the plan; a runtime must match it.
    pub version: String,
    pub header_version: String,
    pub library: String,
    /// Compute capabilities the plan targets ("sm86", ...); empty means the flavour's default set.
    pub targets: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IoTensor {
    pub name: String,
    /// "input" or "output".
    pub mode: String,
    pub dtype: String,
    /// Dimensions as TensorRT sees them; -1 is dynamic.
    pub shape: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub profile: Option<ShapeRange>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuilderInfo {
    pub strongly_typed: bool,
    pub optimization_level: Option<i32>,
    pub workspace_bytes: Option<u64>,
    pub refittable: bool,
    pub weight_streaming: bool,
    pub timing_cache: Option<String>,
    pub layers: i32,
    pub parse_seconds: f64,
    pub build_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    pub onnx: String,
    pub bytes: u64,
    pub sha256: String,
    pub external_data: Vec<ExternalFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExternalFile {
    pub file: String,
    pub bytes: u64,
    pub xxh3_128: String,
}

impl IoTensor {
    /// One line for listings: mode, name, dtype, shape and the profile when there is one.
    pub fn describe(&self) -> String {
        let profile = self
            .profile
            .as_ref()
            .map(|p| format!("  profile {p}"))
            .unwrap_or_default();
        format!(
            "  {:<6} {:<24} {:<12} {:?}{profile}",
            self.mode, self.name, self.dtype, self.shape
        )
    }
}

impl TensorRtInfo {
    pub fn flavor_display(&self) -> &'static str {
        self.flavor.display()
    }
}

/// `model.plan` -> `model.plan.json`.
pub fn sidecar_path(plan: &Path) -> PathBuf {
    let mut s = plan.as_os_str().to_os_string();
    s.push(".json");
    PathBuf::from(s)
}

impl Manifest {
    /// What built the engine, for one-line summaries: "a 4.8 MB plan, TensorRT-RTX 1.7.0" or "ONNX only".
    pub fn engine_summary(&self) -> String {
        match (&self.plan, &self.tensorrt) {
            (Some(p), Some(t)) => format!(
                "a {} plan, {} {}",
                crate::fsutil::human_bytes(p.bytes),
                t.flavor_display(),
                t.version
            ),
            _ => "ONNX only, no TensorRT plan: runs with --backend cuda or cpu".into(),
        }
    }

    /// The TensorRT library that built the plan (every plan's manifest has one).
    pub fn trt(&self) -> Result<&TensorRtInfo> {
        self.tensorrt.as_ref().context(
            "the manifest describes an ONNX-only bundle (no TensorRT plan); run it with --backend cuda or cpu, or \
             build a plan with `trt-diff build` without --onnx-only",
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serializes")
    }

    /// Writes the manifest under a temporary name; the caller commits it after the plan.
    pub fn write_pending(&self, plan: &Path) -> Result<AtomicFile> {
        let path = sidecar_path(plan);
        let mut f = AtomicFile::create(&path)?;
        f.write_all(self.to_json().as_bytes())
            .with_context(|| format!("writing '{}' failed", path.display()))?;
        Ok(f)
    }

    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest '{}'", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a trt-diff manifest ({e}); rebuild the engine with `trt-diff build`",
                path.display()
            )
        })?;
        if m.format != FORMAT {
            bail!(
                "'{}' has manifest format '{}', this trt-diff reads '{FORMAT}'; rebuild the engine",
                path.display(),
                m.format
            );
        }
        Ok(m)
    }
}

/// What `inspect` learns from a plan file and its manifest.
pub struct PlanReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub manifest: Option<Manifest>,
}

/// Checks a plan file and its manifest (when there is one) completely: header, size and checksum.
pub fn check_plan(path: &Path) -> Result<PlanReport> {
    let engine = EngineFile::open(path)?;
    engine.verify_plan_checksum()?;
    Ok(PlanReport {
        bytes: engine.plan_bytes,
        path: engine.path,
        manifest: engine.manifest,
    })
}

/// What `--engine` named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// A TensorRT plan, with its manifest beside it when trt-diff built it.
    Plan,
    /// An ONNX file on its own.
    Onnx,
    /// A manifest without a plan (`build --onnx-only`): its graphs run on ONNX Runtime.
    OnnxBundle,
}

/// An engine file as `--engine` names it, opened once: a `.plan` with its manifest (when present), an `.onnx`
/// file, or the manifest of an ONNX-only bundle (`NAME.plan.json`, or `NAME.plan` when only the manifest exists). Every file the manifest names is resolved through [`EngineFile::file`], which keeps it inside the
/// engine's folder.
#[derive(Clone, Debug)]
pub struct EngineFile {
    pub path: PathBuf,
    /// The folder every relative name of the manifest is resolved in.
    pub dir: PathBuf,
    pub manifest: Option<Manifest>,
    pub kind: EngineKind,
    /// Size of the plan file (0 for the other kinds).
    pub plan_bytes: u64,
    /// Files outside `dir` are allowed (`--allow-external-paths`).
    pub allow_external: bool,
}

impl EngineFile {
    /// Opens `path` (.plan, .onnx or an ONNX-only bundle's manifest): checks that it exists, a plan's header and
    /// recorded size, and reads the manifest beside a plan. The plan's checksum is verified only when TensorRT loads it
    /// ([`EngineFile::verify_plan_checksum`]).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    pub fn open_with(path: &Path, allow_external: bool) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut engine = EngineFile {
            path: path.to_path_buf(),
            dir,
            manifest: None,
            kind: EngineKind::Plan,
            plan_bytes: 0,
            allow_external,
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let sidecar = sidecar_path(path);
        if ext == "json" || (!path.exists() && sidecar.exists()) {
            let manifest_path = if ext == "json" { path } else { &sidecar };
            let m = Manifest::read(manifest_path)?;
            match &m.plan {
                // A plan's manifest named directly: open the plan it describes.
                Some(p) if ext == "json" => {
                    let plan = engine.file(&p.file, "the plan")?;
                    return Self::open_with(&plan, allow_external);
                }
                Some(_) => bail!(
                    "cannot open engine '{}': no such file, although its manifest '{}' is there; the plan was                      deleted or moved: rebuild it with `trt-diff build`",
                    path.display(),
                    sidecar.display()
                ),
                None => {
                    engine.kind = EngineKind::OnnxBundle;
                    engine.manifest = Some(m);
                    return Ok(engine);
                }
            }
        }
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "cannot open engine '{}': no such file; check the path (build one with `trt-diff build`)",
                path.display()
            )
        })?;
        if ext == "onnx" {
            engine.kind = EngineKind::Onnx;
            return Ok(engine);
        }
        let bytes = meta.len();
        let mut head = [0u8; 32];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .with_context(|| format!("cannot read '{}'", path.display()))?;
        if !looks_like_plan(&head[..n]) {
            bail!(
                "'{}' is not a TensorRT plan (its header is not a serialized engine's, {}): the file is corrupt or \
                 of another kind; rebuild it with `trt-diff build`",
                path.display(),
                human_bytes(bytes)
            );
        }
        if let Some(recorded) = recorded_plan_size(&head[..n])
            && recorded != bytes
        {
            bail!(
                "'{}' is {bytes} bytes but its header says {recorded}: the plan is truncated or damaged; rebuild it \
                 with `trt-diff build`",
                path.display()
            );
        }
        if sidecar.exists() {
            let m = Manifest::read(&sidecar)?;
            let (Some(recorded), Some(_), Some(_)) =
                (m.plan.as_ref().map(|p| p.bytes), &m.tensorrt, &m.builder)
            else {
                bail!(
                    "'{}' does not describe a plan (an ONNX-only bundle's manifest, or an incomplete one), but the \
                     plan '{}' sits beside it: the files are mixed up; rebuild with `trt-diff build`",
                    sidecar.display(),
                    path.display()
                );
            };
            if recorded != bytes {
                bail!(
                    "'{}' is {bytes} bytes but its manifest records {recorded}: the plan is truncated or was \
                     replaced; rebuild it",
                    path.display(),
                );
            }
            engine.manifest = Some(m);
        }
        engine.plan_bytes = bytes;
        Ok(engine)
    }

    /// A TensorRT plan (what `--backend trt` needs).
    pub fn is_plan(&self) -> bool {
        self.kind == EngineKind::Plan
    }

    /// The manifest, or an error saying what needs it.
    pub fn manifest(&self, what: &str) -> Result<&Manifest> {
        self.manifest.as_ref().with_context(|| {
            format!(
                "'{}' has no manifest ('{}'), which {what} needs; build the engine with `trt-diff build`",
                self.path.display(),
                sidecar_path(&self.path).display()
            )
        })
    }

    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.manifest.as_ref().and_then(|m| m.pipeline.as_ref())
    }

    /// A file the manifest names, resolved inside the engine's folder: no absolute paths, no `..`, no symbolic
    /// link that leads out, and the file must exist.
    pub fn file(&self, name: &str, what: &str) -> Result<PathBuf> {
        let rel = Path::new(name);
        let plain = !name.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        let path = if plain {
            self.dir.join(rel)
        } else {
            rel.to_path_buf()
        };
        if !plain && !self.allow_external {
            bail!(
                "the manifest of '{}' names {what} '{name}', which is outside the engine's folder; trt-diff reads \
                 only files beside the engine. Move the file next to the engine and rebuild, or pass \
                 --allow-external-paths if you trust this manifest",
                self.path.display()
            );
        }
        if !path.exists() {
            bail!(
                "{what} '{}' of '{}' is missing; rebuild the engine with `trt-diff build`",
                path.display(),
                self.path.display()
            );
        }
        if plain && !self.allow_external {
            let real = path
                .canonicalize()
                .with_context(|| format!("cannot resolve '{}'", path.display()))?;
            let root = self
                .dir
                .canonicalize()
                .with_context(|| format!("cannot resolve '{}'", self.dir.display()))?;
            if !real.starts_with(&root) {
                bail!(
                    "{what} '{}' of '{}' is a link to '{}', outside the engine's folder; replace the link with the \
                     file, or pass --allow-external-paths if you trust it",
                    path.display(),
                    self.path.display(),
                    real.display()
                );
            }
        }
        Ok(path)
    }

    /// The ONNX graph the plan was built from (what the CPU backend runs), checked against the size and sha256
    /// the manifest records.
    pub fn source_onnx(&self) -> Result<PathBuf> {
        let m = self.manifest("running the plan without TensorRT")?;
        let path = self.file(&m.source.onnx, "the source ONNX")?;
        let bytes = std::fs::metadata(&path)?.len();
        if bytes != m.source.bytes || crate::fsutil::sha256_file(&path)? != m.source.sha256 {
            bail!(
                "'{}' is not the ONNX file '{}' was built from (size or sha256 differ from its manifest): it was \
                 changed after the build; rebuild the engine",
                path.display(),
                self.path.display()
            );
        }
        let onnx_dir = Path::new(&m.source.onnx).parent().unwrap_or(Path::new(""));
        for x in &m.source.external_data {
            let name = onnx_dir.join(&x.file).to_string_lossy().into_owned();
            let p = self.file(&name, "the source ONNX's external data")?;
            if std::fs::metadata(&p)?.len() != x.bytes {
                bail!(
                    "'{}' (external data of '{}') does not have the {} bytes its manifest records; rebuild the engine",
                    p.display(),
                    path.display(),
                    x.bytes
                );
            }
        }
        Ok(path)
    }

    /// Reads the whole plan and compares its checksum with the manifest's (before TensorRT deserializes it).
    pub fn verify_plan_checksum(&self) -> Result<()> {
        if let Some(p) = self.manifest.as_ref().and_then(|m| m.plan.as_ref())
            && xxh3_file(&self.path)? != p.xxh3_128
        {
            bail!(
                "'{}' does not match the checksum in its manifest: the plan is corrupt or was replaced; rebuild it",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// Serialized engines start with a tag: "vtrt" at byte 0 (TensorRT-RTX, which also records the total plan size as
/// a little-endian u64 at byte 16) or "ftrt" at byte 4 (TensorRT).
pub fn looks_like_plan(head: &[u8]) -> bool {
    (head.len() >= 4 && &head[..4] == b"vtrt") || (head.len() >= 8 && &head[4..8] == b"ftrt")
}

/// The size a plan's header says it has, where the format records it.
pub fn recorded_plan_size(head: &[u8]) -> Option<u64> {
    if head.len() >= 24 && &head[..4] == b"vtrt" {
        Some(u64::from_le_bytes(head[16..24].try_into().ok()?))
    } else {
        None
    }
}
