//! What a safetensors checkpoint holds: every tensor with its dtype, shape and size, the quantized ones grouped
//! with their companion tensors (scales, absmax, quant maps, quant state) under the format they are in, and,
//! given the unquantized original, each quantized tensor's error (RMSE, max abs, SQNR) after dequantization.
use super::checkpoint::dequantize_tensor;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
pub struct ErrorStats {
    pub rmse: f64,
    pub max_abs: f64,
    /// Signal-to-quantization-noise ratio in dB (infinite when the values are reproduced exactly).
    pub sqnr_db: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Bytes of the tensor and its companions.
    pub bytes: u64,
    /// "nf4", "fp4", "nvfp4", "fp8", "mxfp8", "int8", "int4", or None for a plain tensor.
    pub format: Option<String>,
    pub companions: Vec<String>,
    pub error: Option<ErrorStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    pub path: String,
    /// Whose layout the quantized tensors are in: comfyui, modelopt, bitsandbytes or plain (filled in by the
    /// caller from `weights::prequant::file_layout`, which this layer cannot see).
    pub layout: Option<String>,
    pub file_bytes: u64,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorRow>,
}

const BNB_SUFFIXES: [&str; 5] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__",
];

fn open(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open '{}'; check the path", path.display()))?;
    // SAFETY: read-only map of a file nothing else writes while we read it.
    unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map '{}'", path.display()))
}

fn parse<'a>(path: &Path, map: &'a [u8]) -> Result<safetensors::SafeTensors<'a>> {
    safetensors::SafeTensors::deserialize(map).map_err(|e| {
        anyhow::anyhow!(
            "'{}' is not a valid safetensors file ({e}); it may be truncated or of another format",
            path.display()
        )
    })
}

/// The format of main tensor `name`, from the companions present.
fn format_of(st: &safetensors::SafeTensors<'_>, name: &str, dtype: &str) -> Option<&'static str> {
    let has = |suffix: &str| st.tensor(&format!("{name}{suffix}")).is_ok();
    if has(".quant_state.bitsandbytes__nf4") {
        return Some("nf4");
    }
    if has(".quant_state.bitsandbytes__fp4") {
        return Some("fp4");
    }
    let scale = st.tensor(&format!("{name}_scale")).ok()?;
    let scale_dtype = format!("{:?}", scale.dtype());
    Some(match (dtype, scale_dtype.as_str()) {
        ("U8", _) if has("_scale_2") => "nvfp4",
        ("F8_E4M3", "U8") => "mxfp8",
        ("F8_E4M3", _) => "fp8",
        ("I8", _) => "int8",
        ("U8", _) => "int4",
        _ => return None,
    })
}

fn companions(names: &[String], name: &str, format: &str) -> Vec<String> {
    names
        .iter()
        .filter(|n| match format {
            "nf4" | "fp4" => n
                .strip_prefix(name)
                .is_some_and(|rest| BNB_SUFFIXES.iter().any(|s| rest.starts_with(s))),
            "nvfp4" => {
                **n == format!("{name}_scale")
                    || **n == format!("{name}_scale_2")
                    || layer_companion(n, name)
            }
            _ => **n == format!("{name}_scale") || layer_companion(n, name),
        })
        .cloned()
        .collect()
}

/// The per-layer companions of weight `<layer>.weight`: its activation scale and ComfyUI marker.
fn layer_companion(n: &str, weight: &str) -> bool {
    let layer = weight.strip_suffix(".weight").unwrap_or(weight);
    n.strip_prefix(layer)
        .is_some_and(|rest| rest == ".input_scale" || rest == super::comfy::MARKER)
}

pub fn error_stats(reference: &[f32], got: &[f32]) -> ErrorStats {
    let (mut se, mut ss, mut max_abs) = (0f64, 0f64, 0f64);
    for (&r, &g) in reference.iter().zip(got) {
        let d = (r as f64 - g as f64).abs();
        se += d * d;
        ss += (r as f64) * (r as f64);
        max_abs = max_abs.max(d);
    }
    let n = reference.len().max(1) as f64;
    ErrorStats {
        rmse: (se / n).sqrt(),
        max_abs,
        sqnr_db: if se == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (ss / se).log10()
        },
    }
}

/// Describes `path`; with `against` (the unquantized checkpoint it came from), measures each quantized
/// tensor's error against the original values.
pub fn inspect_checkpoint(path: &Path, against: Option<&Path>) -> Result<CheckpointReport> {
    let map = open(path)?;
    let st = parse(path, &map)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        anyhow::anyhow!("'{}': unreadable safetensors header ({e})", path.display())
    })?;
    let orig_map = against.map(open).transpose()?;
    let orig = match (&orig_map, against) {
        (Some(m), Some(p)) => Some((p, parse(p, m)?)),
        _ => None,
    };
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut claimed = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for name in &names {
        let t = st.tensor(name)?;
        let dtype = format!("{:?}", t.dtype());
        if let Some(f) = format_of(&st, name, &dtype) {
            let comp = companions(&names, name, f);
            claimed.extend(comp.iter().cloned());
            let bytes = t.data().len() as u64
                + comp
                    .iter()
                    .map(|c| st.tensor(c).map(|x| x.data().len() as u64).unwrap_or(0))
                    .sum::<u64>();
            let error = match &orig {
                Some((op, o)) => {
                    let Ok(ot) = o.tensor(name) else {
                        anyhow::bail!(
                            "'{}' has no tensor '{name}': --against must name the checkpoint '{}' was quantized from",
                            op.display(),
                            path.display()
                        );
                    };
                    let reference =
                        super::elem::Values::from_bytes(&format!("{:?}", ot.dtype()), ot.data())
                            .with_context(|| {
                                format!("'{}': tensor '{name}' is not a float tensor", op.display())
                            })?
                            .to_f32();
                    let got = dequantize_tensor(&st, path, name)?;
                    if got.len() != reference.len() {
                        anyhow::bail!(
                            "'{name}': {} values after dequantization, {} in '{}'; not the same checkpoint",
                            got.len(),
                            reference.len(),
                            op.display()
                        );
                    }
                    Some(error_stats(&reference, &got))
                }
                None => None,
            };
            rows.push(TensorRow {
                name: name.clone(),
                dtype,
                shape: t.shape().to_vec(),
                bytes,
                format: Some(f.to_string()),
                companions: comp,
                error,
            });
        }
    }
    for name in &names {
        if claimed.contains(name) || rows.iter().any(|r| &r.name == name) {
            continue;
        }
        let t = st.tensor(name)?;
        rows.push(TensorRow {
            name: name.clone(),
            dtype: format!("{:?}", t.dtype()),
            shape: t.shape().to_vec(),
            bytes: t.data().len() as u64,
            format: None,
            companions: vec![],
            error: None,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(CheckpointReport {
        path: path.display().to_string(),
        layout: None,
        file_bytes: map.len() as u64,
        metadata: meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        tensors: rows,
    })
}
