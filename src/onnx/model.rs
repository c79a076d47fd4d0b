//! Reading ONNX files made anywhere: memory-mapped and decoded without copying weights, checked for the damage
//! that truncation leaves (undefined values, external data past the end of its file).
use super::proto::{DATA_LOCATION_EXTERNAL, ModelProto, TensorProto};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use prost::Message;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub struct OnnxFile {
    pub path: PathBuf,
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

impl OnnxFile {
    pub fn load(path: &Path) -> Result<Self> {
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
        let onnx = OnnxFile {
            path: path.to_path_buf(),
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
        for t in &graph.initializer {
            if let Some(ext) = external_ref(t) {
                let data = self.dir().join(&ext.location);
                let len = std::fs::metadata(&data)
                    .with_context(|| {
                        format!(
                            "'{p}': initializer '{}' lives in external data file '{}', which cannot be opened; keep the \
                             data file beside the .onnx file",
                            t.name,
                            data.display()
                        )
                    })?
                    .len();
                let end = ext.offset + ext.length.unwrap_or(0);
                if end > len {
                    bail!(
                        "'{p}': initializer '{}' needs bytes {}..{end} of '{}', which has only {len}: the data file \
                         is truncated; re-export it",
                        t.name,
                        ext.offset,
                        data.display()
                    );
                }
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
                    let path = self.dir().join(&r.location);
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
            let start = r.offset as usize;
            let end = r.length.map(|l| start + l as usize).unwrap_or(data.len());
            out.push((t.name.clone(), data.slice(start..end)));
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
