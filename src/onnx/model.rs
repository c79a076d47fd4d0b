//! Reading ONNX files made anywhere: memory-mapped and decoded without copying weights, checked for the damage
//! that truncation leaves (undefined values, external data past the end of its file).
use super::proto::{
    DATA_LOCATION_EXTERNAL, GraphProto, ModelProto, SparseTensorProto, TensorProto,
};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use prost::Message;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// How many nodes a graph may have before `load` refuses it (see [`LoadOptions::max_nodes`]).
pub const DEFAULT_MAX_NODES: usize = 100_000;

/// Environment variable that overrides [`DEFAULT_MAX_NODES`] (0: no limit).
pub const MAX_NODES_ENV: &str = "TRT_DIFF_MAX_ONNX_NODES";

/// How an ONNX file may be read.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Let external-data `location`s name files outside the model's folder (absolute paths, `..`, symlinks
    /// leading out). Off by default: a model file must not make trt-diff read arbitrary files
    /// (`--allow-external-paths`).
    pub allow_external: bool,
    /// Most graph nodes accepted (None or Some(0): no limit). `build` sets [`default_max_nodes`].
    pub max_nodes: Option<usize>,
}

/// The node limit `build` applies unless told otherwise: [`MAX_NODES_ENV`] if set (0: none), else
/// [`DEFAULT_MAX_NODES`].
pub fn default_max_nodes() -> usize {
    std::env::var(MAX_NODES_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_NODES)
}

pub struct OnnxFile {
    pub path: PathBuf,
    /// Whether external data may live outside the model's folder ([`LoadOptions::allow_external`]).
    pub allow_external: bool,
    pub file_bytes: u64,
    pub model: ModelProto,
    /// The whole mapped file (initializers' `raw_data` point into it).
    pub raw: Bytes,
}

/// Where an initializer's bytes live when they are outside the .onnx file.
#[derive(Clone, Debug)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    /// None when the entry leaves the length out (then the tensor runs to the end of the file).
    pub length: Option<u64>,
}

pub fn external_ref(t: &TensorProto) -> Option<ExternalRef> {
    if t.data_location != DATA_LOCATION_EXTERNAL {
        return None;
    }
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    Some(ExternalRef {
        location: get("location").unwrap_or_default(),
        offset: get("offset").and_then(|v| v.parse().ok()).unwrap_or(0),
        length: get("length").and_then(|v| v.parse().ok()),
    })
}

/// An external-data entry's `offset`/`length` as a number; a missing key is None, a malformed value an error.
fn parse_entry(t: &TensorProto, key: &str, p: &std::path::Display<'_>) -> Result<Option<u64>> {
    match t.external_data.iter().find(|e| e.key == key) {
        None => Ok(None),
        Some(e) => e.value.trim().parse::<u64>().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "'{p}': initializer '{}' has external-data {key} '{}', which is not a byte count: the file is \
                 corrupt; re-export it",
                t.name,
                e.value
            )
        }),
    }
}

/// Resolves an external-data `location` of the model in `dir` (named `model` in errors). Unless `allow` is set it
/// must stay inside `dir`: relative, without `..`, and not through a symlink that leads out.
pub fn resolve_external(model: &Path, dir: &Path, location: &str, allow: bool) -> Result<PathBuf> {
    let m = model.display();
    if location.is_empty() {
        bail!(
            "'{m}': an initializer's external data has no location: the file is corrupt; re-export it"
        );
    }
    if location.contains('\0') {
        bail!(
            "'{m}': external-data location {location:?} contains a NUL byte: the file is corrupt"
        );
    }
    if allow {
        return Ok(dir.join(location));
    }
    crate::fsutil::confined_path(dir, location).map_err(|why| {
        anyhow::anyhow!(
            "'{m}': external data location '{location}' {why}, outside the model's folder '{}'; refused. Fix: keep \
             external data files in the model's folder (re-export with relative locations), or pass \
             --allow-external-paths if you trust this model file",
            dir.display()
        )
    })
}

/// Collects every tensor of `g`: initializers, sparse initializers, and node attributes, recursing into
/// subgraphs (protobuf decoding bounds the nesting depth).
fn all_tensors<'a>(g: &'a GraphProto, out: &mut Vec<&'a TensorProto>) {
    let sparse = |s: &'a SparseTensorProto, out: &mut Vec<&'a TensorProto>| {
        out.extend(s.values.iter());
        out.extend(s.indices.iter());
    };
    out.extend(g.initializer.iter());
    for s in &g.sparse_initializer {
        sparse(s, out);
    }
    for n in &g.node {
        for a in &n.attribute {
            out.extend(a.t.iter());
            out.extend(a.tensors.iter());
            for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
                sparse(s, out);
            }
            for sub in a.g.iter().chain(&a.graphs) {
                all_tensors(sub, out);
            }
        }
    }
}

impl OnnxFile {
    /// Reads an ONNX file with the default [`LoadOptions`] (external data confined to the model's folder).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// The path of an external-data file named by `location`, checked as [`resolve_external`] does.
    pub fn external_path(&self, location: &str) -> Result<PathBuf> {
        resolve_external(&self.path, self.dir(), location, self.allow_external)
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| {
            format!(
                "cannot open ONNX file '{}': check the path (export one with `trt-diff export`)",
                path.display()
            )
        })?;
        let file_bytes = file.metadata()?.len();
        if file_bytes == 0 {
            bail!(
                "'{}' is empty: not an ONNX model (re-export or re-download it)",
                path.display()
            );
        }
        // SAFETY: the map is read-only; a file changed underneath us gives wrong data, not unsoundness in practice.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map '{}'", path.display()))?;
        let raw = Bytes::from_owner(map);
        let model = ModelProto::decode(raw.clone()).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a valid ONNX model ({e}): the file is truncated or corrupt; re-export or re-download it",
                path.display()
            )
        })?;
        let nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
        let limit = match opts.max_nodes {
            None | Some(0) => usize::MAX,
            Some(n) => n,
        };
        if nodes > limit {
            bail!(
                "'{}' has {nodes} graph nodes, more than the limit of {limit}: a graph this large takes minutes and \
                 gigabytes to build. If the model is meant to be this large, raise the limit with the environment \
                 variable {MAX_NODES_ENV}=N (0: no limit)",
                path.display()
            );
        }
        let onnx = OnnxFile {
            path: path.to_path_buf(),
            allow_external: opts.allow_external,
            file_bytes,
            model,
            raw,
        };
        onnx.validate()?;
        Ok(onnx)
    }

    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Structural checks that catch files cut at a message boundary, which protobuf alone decodes "fine".
    fn validate(&self) -> Result<()> {
        let p = self.path.display();
        let Some(graph) = &self.model.graph else {
            bail!("'{p}' holds no graph: not an ONNX model, or truncated; re-export it");
        };
        if self.model.ir_version <= 0 || self.model.opset_import.is_empty() {
            bail!(
                "'{p}' has no IR version or opset imports: not an ONNX model, or corrupt; re-export it"
            );
        }
        let mut defined: HashSet<&str> = HashSet::new();
        defined.extend(graph.input.iter().map(|v| v.name.as_str()));
        defined.extend(graph.initializer.iter().map(|t| t.name.as_str()));
        for (i, node) in graph.node.iter().enumerate() {
            for input in &node.input {
                if !input.is_empty() && !defined.contains(input.as_str()) {
                    bail!(
                        "'{p}': node {i} '{}' ({}) reads '{input}', which nothing defines before it: the graph is \
                         truncated, corrupt or not topologically sorted; re-export it",
                        node.name,
                        node.op_type
                    );
                }
            }
            defined.extend(node.output.iter().map(|s| s.as_str()));
        }
        for out in &graph.output {
            if !defined.contains(out.name.as_str()) {
                bail!(
                    "'{p}': graph output '{}' is never produced: the graph is truncated or corrupt; re-export it",
                    out.name
                );
            }
        }
        // Every tensor of the model, subgraphs and attributes included: TensorRT's parser reads external data
        // of tensors that are not initializers of the main graph by itself.
        let mut tensors = Vec::new();
        all_tensors(graph, &mut tensors);
        for t in tensors {
            if t.data_location != DATA_LOCATION_EXTERNAL {
                continue;
            }
            let location = t
                .external_data
                .iter()
                .find(|e| e.key == "location")
                .map(|e| e.value.as_str())
                .unwrap_or("");
            let data = self
                .external_path(location)
                .with_context(|| format!("initializer '{}'", t.name))?;
            let offset = parse_entry(t, "offset", &p)?.unwrap_or(0);
            let length = parse_entry(t, "length", &p)?;
            let meta = std::fs::metadata(&data).with_context(|| {
                format!(
                    "'{p}': initializer '{}' lives in external data file '{}', which cannot be opened; keep the \
                     data file beside the .onnx file",
                    t.name,
                    data.display()
                )
            })?;
            if !meta.is_file() {
                bail!(
                    "'{p}': initializer '{}' names external data '{}', which is not a regular file; the model is \
                     corrupt or its data file is missing; re-export it",
                    t.name,
                    data.display()
                );
            }
            let len = meta.len();
            let end = offset.checked_add(length.unwrap_or(0));
            if offset > len || end.is_none_or(|e| e > len) {
                bail!(
                    "'{p}': initializer '{}' needs {} bytes at offset {offset} of '{}', which has only {len}: the \
                     data file is truncated or the model is corrupt; re-export it",
                    t.name,
                    length.map_or("the".to_string(), |l| l.to_string()),
                    data.display()
                );
            }
        }
        Ok(())
    }

    /// Maps the external data files and returns every external initializer's bytes, by name.
    pub fn external_weights(&self) -> Result<Vec<(String, Bytes)>> {
        let mut files: std::collections::HashMap<String, Bytes> = std::collections::HashMap::new();
        let mut out = Vec::new();
        for t in self.model.graph.iter().flat_map(|g| &g.initializer) {
            let Some(r) = external_ref(t) else { continue };
            let data = match files.get(&r.location) {
                Some(b) => b.clone(),
                None => {
                    let path = self.external_path(&r.location)?;
                    let f = std::fs::File::open(&path).with_context(|| {
                        format!("cannot open external data '{}'", path.display())
                    })?;
                    // SAFETY: read-only map of a file we do not modify.
                    let map = unsafe { memmap2::Mmap::map(&f) }
                        .with_context(|| format!("cannot memory-map '{}'", path.display()))?;
                    let b = Bytes::from_owner(map);
                    files.insert(r.location.clone(), b.clone());
                    b
                }
            };
            // Checked again here: the file may have changed since `load`.
            let start = usize::try_from(r.offset).ok().filter(|&s| s <= data.len());
            let end = match (start, r.length) {
                (Some(s), Some(l)) => usize::try_from(l).ok().and_then(|l| s.checked_add(l)),
                (Some(_), None) => Some(data.len()),
                (None, _) => None,
            };
            match (start, end) {
                (Some(s), Some(e)) if e <= data.len() => {
                    out.push((t.name.clone(), data.slice(s..e)))
                }
                _ => bail!(
                    "'{}': initializer '{}' needs bytes at offset {} (length {:?}) of external data '{}', which has \
                     only {}: the data file is truncated or changed; re-export the model",
                    self.path.display(),
                    t.name,
                    r.offset,
                    r.length,
                    r.location,
                    data.len()
                ),
            }
        }
        Ok(out)
    }

    /// Opset version imported for a domain ("" is the default ONNX domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let norm = |d: &str| {
            if d == "ai.onnx" {
                String::new()
            } else {
                d.to_string()
            }
        };
        self.model
            .opset_import
            .iter()
            .find(|o| norm(&o.domain) == norm(domain))
            .map(|o| o.version)
    }
}
