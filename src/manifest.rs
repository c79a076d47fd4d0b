//! The engine file: a standard TensorRT plan (loadable by trtexec, Triton, ...) plus a JSON sidecar manifest
//! `<plan>.json` that says what the plan holds and how it was made.
use crate::fsutil::{AtomicFile, human_bytes, xxh3_file};
use crate::trt::Flavor;
use crate::trt::shapes::ShapeRange;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "trt-diff.engine/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub created: String,
    pub created_by: String,
    pub plan: PlanInfo,
    pub tensorrt: TensorRtInfo,
    pub io: Vec<IoTensor>,
    pub builder: BuilderInfo,
    pub source: SourceInfo,
    /// Set when the plan is a whole pipeline's engine (e.g. an LLM decoder with its tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
}

/// What `generate` needs beyond the plan, with files named relative to the manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Pipeline {
    Llm {
        arch: String,
        config: crate::models::llama::LlamaConfig,
        tokenizer: String,
        precision: String,
        /// A graph for ONNX Runtime on the CPU (16-bit weights through trt-diff's own operator), beside the plan;
        /// the CPU backend runs it instead of the TensorRT graph.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_onnx: Option<String>,
    },
    /// A Flux bundle: the plan is the transformer's engine; the other components sit beside it.
    Flux(Box<crate::pipelines::flux_build::FluxBundle>),
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

/// Checks a plan against its manifest (size, then checksum) and TensorRT's serialized-engine header.
pub fn check_plan(path: &Path) -> Result<PlanReport> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "cannot open plan '{}': check the path (build one with `trt-diff build`)",
            path.display()
        )
    })?;
    let bytes = meta.len();
    let mut head = [0u8; 32];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    if !looks_like_plan(&head[..n]) {
        bail!(
            "'{}' is not a TensorRT plan (its header is not a serialized engine's, {}): the file is corrupt or of \
             another kind; rebuild it with `trt-diff build`",
            path.display(),
            human_bytes(bytes)
        );
    }
    if let Some(recorded) = recorded_plan_size(&head[..n])
        && recorded != bytes
    {
        bail!(
            "'{}' is {bytes} bytes but its header says {recorded}: the plan is truncated or damaged; rebuild it with \
             `trt-diff build`",
            path.display()
        );
    }
    let sidecar = sidecar_path(path);
    let manifest = if sidecar.exists() {
        Some(Manifest::read(&sidecar)?)
    } else {
        None
    };
    if let Some(m) = &manifest {
        if m.plan.bytes != bytes {
            bail!(
                "'{}' is {bytes} bytes but its manifest records {}: the plan is truncated or was replaced; rebuild it",
                path.display(),
                m.plan.bytes
            );
        }
        if xxh3_file(path)? != m.plan.xxh3_128 {
            bail!(
                "'{}' does not match the checksum in its manifest: the plan is corrupt or was replaced; rebuild it",
                path.display()
            );
        }
    }
    Ok(PlanReport {
        path: path.to_path_buf(),
        bytes,
        manifest,
    })
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
