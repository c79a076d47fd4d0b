//! Pre-quantized checkpoints as build sources: ComfyUI's NVFP4 / FP8 files ([`crate::quant::comfy`]), ModelOpt's
//! Hugging Face exports (`<w>_scale`, `<w>_scale_2`, `<layer>.input_scale`; also what `trt-diff quantize` writes in
//! that naming) and bitsandbytes NF4 / FP4 state dicts. A [`Scan`] of the tensor index finds the quantized weights
//! and their companions, checking every size before anything is read; [`decode`] gives a weight's values as f32
//! and, where the format maps exactly onto a TensorRT Q/DQ format (NVFP4, per-tensor FP8), the stored codes and
//! scales in the form the Q/DQ export writes, so that they reach the engine unchanged. NF4, FP4, MXFP8, INT8 and
//! INT4 weights have no exact TensorRT counterpart here and are dequantized.
use crate::onnx::DataType;
use crate::quant::checkpoint::{RawTensor, dequantize_from};
use crate::quant::comfy::{self, ComfyFormat};
use crate::quant::minifloat::E4M3FN;
use crate::quant::nvfp4;
use anyhow::{Result, bail};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Whose layout a checkpoint's quantized weights are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceLayout {
    Plain,
    Comfyui,
    Modelopt,
    Bitsandbytes,
}

impl SourceLayout {
    pub fn name(self) -> &'static str {
        match self {
            SourceLayout::Plain => "plain",
            SourceLayout::Comfyui => "comfyui",
            SourceLayout::Modelopt => "modelopt",
            SourceLayout::Bitsandbytes => "bitsandbytes",
        }
    }
}

/// A weight [rows, cols] in a format the Q/DQ export takes as stored.
#[derive(Debug)]
pub enum QuantWeight {
    /// ModelOpt / ONNX order: element 0 in the low nibble, E4M3 block scales [rows, cols / 16] row-major.
    Nvfp4 {
        packed: Vec<u8>,
        block_scales: Vec<u8>,
        global_scale: f32,
    },
    /// E4M3 codes [rows, cols] and the per-tensor scale.
    Fp8 { codes: Vec<u8>, scale: f32 },
}

/// What a checkpoint said about a quantized weight beyond its values.
#[derive(Debug)]
pub struct Prequant {
    pub weight: QuantWeight,
    /// The layer's stored activation scale (`input_scale`), if any.
    pub input_scale: Option<f32>,
    pub layout: SourceLayout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ComfyNvfp4,
    ComfyFp8,
    ModeloptNvfp4,
    ModeloptFp8,
    /// Dequantized through [`dequantize_from`] (bitsandbytes, MXFP8, INT8, INT4).
    Dequantized,
}

#[derive(Clone, Debug)]
pub struct Entry {
    kind: Kind,
    layout: SourceLayout,
    /// The weight's logical shape.
    pub shape: Vec<usize>,
    input_scale: Option<String>,
}

/// The quantized weights of a checkpoint.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: BTreeMap<String, Entry>,
    /// Companion tensors (scales, markers, quant states): not weights of the model.
    pub companions: BTreeSet<String>,
}

impl Scan {
    /// The layout found: ComfyUI's where any marker is, else bitsandbytes', ModelOpt's, or plain.
    pub fn layout(&self) -> SourceLayout {
        let has = |l: SourceLayout| self.entries.values().any(|e| e.layout == l);
        [
            SourceLayout::Comfyui,
            SourceLayout::Bitsandbytes,
            SourceLayout::Modelopt,
        ]
        .into_iter()
        .find(|&l| has(l))
        .unwrap_or(SourceLayout::Plain)
    }
}

/// One tensor of the index: its element type and stored shape.
pub type Index = BTreeMap<String, (DataType, Vec<usize>)>;
/// Reads a tensor's bytes.
pub type Reader<'a> = &'a dyn Fn(&str) -> Result<Bytes>;

/// The element type of a safetensors dtype trt-diff reads.
pub fn onnx_dtype(d: safetensors::Dtype) -> Option<DataType> {
    use safetensors::Dtype as D;
    Some(match d {
        D::F32 => DataType::FLOAT,
        D::F16 => DataType::FLOAT16,
        D::BF16 => DataType::BFLOAT16,
        D::F8_E4M3 => DataType::FLOAT8E4M3FN,
        D::F8_E5M2 => DataType::FLOAT8E5M2,
        D::U8 => DataType::UINT8,
        D::I8 => DataType::INT8,
        D::I32 => DataType::INT32,
        D::I64 => DataType::INT64,
        D::BOOL => DataType::BOOL,
        _ => return None,
    })
}

/// The safetensors dtype name of an element type (for [`dequantize_from`]).
fn st_name(d: DataType) -> &'static str {
    match d {
        DataType::FLOAT => "F32",
        DataType::FLOAT16 => "F16",
        DataType::BFLOAT16 => "BF16",
        DataType::FLOAT8E4M3FN => "F8_E4M3",
        DataType::FLOAT8E5M2 => "F8_E5M2",
        DataType::UINT8 => "U8",
        DataType::INT8 => "I8",
        DataType::INT32 => "I32",
        DataType::INT64 => "I64",
        _ => "BOOL",
    }
}

const BNB_KINDS: [&str; 2] = ["nf4", "fp4"];
const BNB_SUFFIXES: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];
/// Largest bitsandbytes quant_state JSON read (real ones are a few hundred bytes).
const MAX_STATE_BYTES: usize = 1 << 20;

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Finds the quantized weights of `index` (`file` names the checkpoint in errors). Markers and quant states are
/// read (bounded sizes); nothing else is.
pub fn scan(
    file: &Path,
    index: &Index,
    metadata: &BTreeMap<String, String>,
    read: Reader,
) -> Result<Scan> {
    let f = file.display();
    let mut scan = Scan::default();
    let fix_comfy = "re-save it from ComfyUI, or quantize the original with `trt-diff quantize --layout comfyui`";

    // ComfyUI: markers, then the header map.
    let mut comfy: BTreeMap<String, ComfyFormat> = BTreeMap::new();
    for (name, (dt, shape)) in index {
        let Some(layer) = name.strip_suffix(comfy::MARKER) else {
            continue;
        };
        let n = numel(shape).unwrap_or(usize::MAX);
        if *dt != DataType::UINT8 || n > comfy::MAX_MARKER_BYTES {
            bail!(
                "'{f}': marker '{name}' is {dt} {shape:?}; ComfyUI markers are short U8 JSON strings: {fix_comfy}"
            );
        }
        let fmt = comfy::parse_marker(&read(name)?)
            .map_err(|e| anyhow::anyhow!("'{f}': layer '{layer}': {e}; {fix_comfy}"))?;
        comfy.insert(layer.to_string(), fmt);
        scan.companions.insert(name.clone());
    }
    if let Some(m) = metadata.get(comfy::METADATA_KEY) {
        let layers = comfy::parse_metadata(m).map_err(|e| {
            anyhow::anyhow!(
                "'{f}': header entry {} is {e}; {fix_comfy}",
                comfy::METADATA_KEY
            )
        })?;
        for (layer, fmt) in layers {
            // ComfyUI's map may name layers of other files of a model; only this checkpoint's weights count.
            if !index.contains_key(&format!("{layer}.weight")) {
                continue;
            }
            let fmt = ComfyFormat::parse(&fmt)
                .map_err(|e| anyhow::anyhow!("'{f}': layer '{layer}': {e}; {fix_comfy}"))?;
            if let Some(prev) = comfy.insert(layer.clone(), fmt)
                && prev != fmt
            {
                bail!(
                    "'{f}': layer '{layer}' is {} by its marker and {} by {}: the file contradicts itself; \
                     {fix_comfy}",
                    prev.name(),
                    fmt.name(),
                    comfy::METADATA_KEY
                );
            }
        }
    }
    let get = |n: &str| index.get(n).map(|(d, s)| (*d, s.as_slice()));
    let scalar_f32 = |n: &str, what: &str| -> Result<()> {
        match get(n) {
            Some((DataType::FLOAT, s)) if numel(s) == Some(1) => Ok(()),
            Some((d, s)) => bail!("'{f}': '{n}' ({what}) is {d} {s:?}; it must be one F32 value"),
            None => bail!("'{f}': '{n}' ({what}) is missing"),
        }
    };
    let input_scale = |layer: &str| -> Result<Option<String>> {
        let n = format!("{layer}.input_scale");
        if get(&n).is_none() {
            return Ok(None);
        }
        scalar_f32(&n, "the activation scale")?;
        Ok(Some(n))
    };
    for (layer, fmt) in &comfy {
        let w = format!("{layer}.weight");
        let ctx = |e: anyhow::Error| e.context(format!("ComfyUI {} layer '{layer}'", fmt.name()));
        let Some((dt, shape)) = get(&w) else {
            bail!(
                "'{f}': layer '{layer}' has a {} marker but no '{w}'; {fix_comfy}",
                fmt.name()
            );
        };
        let (kind, logical) = match fmt {
            ComfyFormat::Nvfp4 => {
                if dt != DataType::UINT8 || shape.len() != 2 {
                    bail!(
                        "'{f}': '{w}' is {dt} {shape:?}; ComfyUI NVFP4 weights are U8 [rows, cols / 2]; {fix_comfy}"
                    );
                }
                let (rows, cols) = (shape[0], shape[1] * 2);
                if !cols.is_multiple_of(nvfp4::BLOCK) {
                    bail!(
                        "'{f}': '{w}' holds {cols} values per row, not whole 16-value NVFP4 blocks; {fix_comfy}"
                    );
                }
                let s = format!("{w}_scale");
                let (pr, pc) = comfy::swizzled_shape(rows, cols / nvfp4::BLOCK);
                match get(&s) {
                    Some((DataType::FLOAT8E4M3FN | DataType::UINT8, ss))
                        if numel(ss) == Some(pr * pc) => {}
                    Some((d, ss)) => bail!(
                        "'{f}': '{s}' is {d} {ss:?}; the block scales of '{w}' {shape:?} are E4M3 [{pr}, {pc}] \
                         (cuBLAS layout, rows padded to 128 and columns to 4); {fix_comfy}"
                    ),
                    None => bail!(
                        "'{f}': '{s}' (the block scales of NVFP4 weight '{w}') is missing; {fix_comfy}"
                    ),
                }
                scalar_f32(&format!("{w}_scale_2"), "the NVFP4 global scale").map_err(ctx)?;
                (Kind::ComfyNvfp4, vec![rows, cols])
            }
            ComfyFormat::Fp8E4m3 => {
                if dt != DataType::FLOAT8E4M3FN {
                    bail!(
                        "'{f}': '{w}' is {dt}; ComfyUI float8_e4m3fn weights are F8_E4M3; {fix_comfy}"
                    );
                }
                scalar_f32(&format!("{w}_scale"), "the FP8 weight scale").map_err(ctx)?;
                (Kind::ComfyFp8, shape.to_vec())
            }
        };
        let is = input_scale(layer).map_err(ctx)?;
        for c in [format!("{w}_scale"), format!("{w}_scale_2")] {
            if index.contains_key(&c) {
                scan.companions.insert(c);
            }
        }
        scan.companions.extend(is.clone());
        scan.entries.insert(
            w,
            Entry {
                kind,
                layout: SourceLayout::Comfyui,
                shape: logical,
                input_scale: is,
            },
        );
    }

    // bitsandbytes: a quant_state per weight.
    for name in index.keys() {
        for kind in BNB_KINDS {
            let Some(w) = name.strip_suffix(&format!(".quant_state.bitsandbytes__{kind}")) else {
                continue;
            };
            let fix = "re-save it with bitsandbytes, or quantize the original with `trt-diff quantize --format nf4`";
            let Some((_, shape)) = get(w) else {
                bail!("'{f}': quant state '{name}' has no weight '{w}'; {fix}");
            };
            let n = numel(&index[name].1).unwrap_or(usize::MAX);
            if n > MAX_STATE_BYTES {
                bail!(
                    "'{f}': quant state '{name}' holds {n} bytes; real ones are under 1 KiB; {fix}"
                );
            }
            let state: serde_json::Value = serde_json::from_slice(&read(name)?).map_err(|e| {
                anyhow::anyhow!("'{f}': quant state '{name}' is not JSON ({e}); {fix}")
            })?;
            let logical: Option<Vec<usize>> = state["shape"].as_array().and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            });
            let Some(logical) = logical.filter(|s| numel(s).is_some()) else {
                bail!("'{f}': quant state '{name}' has no valid \"shape\"; {fix}");
            };
            // The packed data must hold the values the state declares (checked again when decoded).
            let packed = numel(shape).unwrap_or(0);
            if numel(&logical).unwrap_or(usize::MAX).div_ceil(2) > packed {
                bail!(
                    "'{f}': quant state '{name}' declares shape {logical:?}, '{w}' holds only {} values; {fix}",
                    packed * 2
                );
            }
            scan.companions.insert(name.clone());
            for s in BNB_SUFFIXES {
                let c = format!("{w}{s}");
                if index.contains_key(&c) {
                    scan.companions.insert(c);
                }
            }
            scan.entries.insert(
                w.to_string(),
                Entry {
                    kind: Kind::Dequantized,
                    layout: SourceLayout::Bitsandbytes,
                    shape: logical,
                    input_scale: None,
                },
            );
        }
    }

    // ModelOpt naming: `<w>_scale` beside a weight that is not ComfyUI's or bitsandbytes'.
    let fix_mo = "re-export it with ModelOpt, or quantize the original with `trt-diff quantize`";
    for (w, (dt, shape)) in index {
        let s = format!("{w}_scale");
        if !w.ends_with(".weight") || scan.entries.contains_key(w) || !index.contains_key(&s) {
            continue;
        }
        let layer = &w[..w.len() - ".weight".len()];
        let (sdt, sshape) = &index[&s];
        let s2 = format!("{w}_scale_2");
        let (kind, logical) = match (*dt, *sdt) {
            (DataType::UINT8, DataType::FLOAT8E4M3FN) if index.contains_key(&s2) => {
                let Some((&last, lead)) = shape.split_last() else {
                    bail!("'{f}': NVFP4 weight '{w}' has no dimensions; {fix_mo}");
                };
                let cols = last * 2;
                let rows = numel(lead).unwrap_or(usize::MAX);
                if !cols.is_multiple_of(nvfp4::BLOCK)
                    || numel(sshape) != rows.checked_mul(cols / nvfp4::BLOCK)
                {
                    bail!(
                        "'{f}': '{s}' is {sshape:?}; NVFP4 weight '{w}' {shape:?} needs one E4M3 scale per 16 \
                         values ([{rows}, {}]); {fix_mo}",
                        cols / nvfp4::BLOCK
                    );
                }
                scalar_f32(&s2, "the NVFP4 global scale")?;
                let mut l = lead.to_vec();
                l.push(cols);
                (Kind::ModeloptNvfp4, l)
            }
            (DataType::FLOAT8E4M3FN, DataType::FLOAT) => {
                if numel(sshape) != Some(1) {
                    bail!(
                        "'{f}': '{s}' is {sshape:?}: per-channel FP8 weight scales are not read; trt-diff reads \
                         ModelOpt's per-tensor FP8 (one F32 scale); {fix_mo}"
                    );
                }
                (Kind::ModeloptFp8, shape.clone())
            }
            (DataType::FLOAT8E4M3FN, DataType::UINT8) | (DataType::INT8, DataType::FLOAT) => {
                (Kind::Dequantized, shape.clone())
            }
            (DataType::UINT8, DataType::FLOAT) => {
                let mut l = shape.clone();
                if let Some(last) = l.last_mut() {
                    *last *= 2;
                }
                (Kind::Dequantized, l)
            }
            (a, b) => bail!(
                "'{f}': weight '{w}' is {a} with a {b} '{s}': not a quantized format trt-diff reads (NVFP4: U8 \
                 with E4M3 scales and '{s2}'; FP8: E4M3 with an F32 scale); {fix_mo}"
            ),
        };
        let is = input_scale(layer)?;
        scan.companions.insert(s);
        if index.contains_key(&s2) {
            scan.companions.insert(s2);
        }
        scan.companions.extend(is.clone());
        scan.entries.insert(
            w.clone(),
            Entry {
                kind,
                layout: SourceLayout::Modelopt,
                shape: logical,
                input_scale: is,
            },
        );
    }
    Ok(scan)
}

fn f32_at(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Weight `name`'s values, and its stored codes and scales where they map exactly onto a Q/DQ format.
pub fn decode(
    file: &Path,
    name: &str,
    e: &Entry,
    index: &Index,
    read: Reader,
) -> Result<(Vec<f32>, Option<Prequant>)> {
    let f = file.display();
    let rows_cols = || {
        let cols = *e.shape.last().unwrap_or(&1);
        (numel(&e.shape).unwrap_or(0) / cols.max(1), cols)
    };
    let scalar = |n: &str| -> Result<f32> {
        let b = read(n)?;
        if b.len() < 4 {
            bail!("'{f}': '{n}' holds no F32 value");
        }
        Ok(f32_at(&b))
    };
    let input_scale = e.input_scale.as_deref().map(scalar).transpose()?;
    let weight = match e.kind {
        Kind::ComfyNvfp4 | Kind::ModeloptNvfp4 => {
            let (rows, cols) = rows_cols();
            let data = read(name)?;
            let scales = read(&format!("{name}_scale"))?;
            let kb = cols / nvfp4::BLOCK;
            let (packed, block_scales) = if e.kind == Kind::ComfyNvfp4 {
                (
                    comfy::swap_nibbles(&data),
                    comfy::unswizzle(&scales, rows, kb)
                        .map_err(|err| anyhow::anyhow!("'{f}': '{name}_scale': {err}"))?,
                )
            } else {
                (data.to_vec(), scales.to_vec())
            };
            if packed.len() * 2 != rows * cols || block_scales.len() != rows * kb {
                bail!(
                    "'{f}': NVFP4 weight '{name}' {:?} has {} packed bytes and {} block scales",
                    e.shape,
                    packed.len(),
                    block_scales.len()
                );
            }
            QuantWeight::Nvfp4 {
                packed,
                block_scales,
                global_scale: scalar(&format!("{name}_scale_2"))?,
            }
        }
        Kind::ComfyFp8 | Kind::ModeloptFp8 => QuantWeight::Fp8 {
            codes: read(name)?.to_vec(),
            scale: scalar(&format!("{name}_scale"))?,
        },
        Kind::Dequantized => {
            let get = |n: &str| {
                let (dt, shape) = index.get(n)?;
                read(n).ok().map(|data| RawTensor {
                    dtype: st_name(*dt).to_string(),
                    shape: shape.clone(),
                    data,
                })
            };
            let v = dequantize_from(&get, file, name)?;
            let want = numel(&e.shape).unwrap_or(0);
            if v.len() < want {
                bail!(
                    "'{f}': '{name}' dequantizes to {} values, its shape {:?} needs {want}",
                    v.len(),
                    e.shape
                );
            }
            return Ok((v[..want].to_vec(), None));
        }
    };
    let values = match &weight {
        // ComfyUI's values as its loader gives them (code 8 as -0); ModelOpt's as ModelOpt does.
        QuantWeight::Nvfp4 {
            packed,
            block_scales,
            global_scale,
        } if e.kind == Kind::ComfyNvfp4 => {
            nvfp4::dequantize_signed_zero(packed, block_scales, *global_scale)
        }
        QuantWeight::Nvfp4 {
            packed,
            block_scales,
            global_scale,
        } => nvfp4::dequantize(packed, block_scales, *global_scale),
        QuantWeight::Fp8 { codes, scale } => {
            codes.iter().map(|&c| E4M3FN.decode(c) * scale).collect()
        }
    };
    Ok((
        values,
        Some(Prequant {
            weight,
            input_scale,
            layout: e.layout,
        }),
    ))
}

/// The layout of safetensors file `path` (its quantized tensors' companions checked as [`scan`] does).
pub fn file_layout(path: &Path) -> Result<SourceLayout> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open '{}' ({e}); check the path", path.display()))?;
    // SAFETY: read-only map of a file nothing else writes while we read it.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| anyhow::anyhow!("cannot map '{}' ({e})", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
        anyhow::anyhow!("'{}' is not a valid safetensors file ({e})", path.display())
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        anyhow::anyhow!("'{}': unreadable safetensors header ({e})", path.display())
    })?;
    let mut index = Index::new();
    for (name, t) in st.tensors() {
        // Other element types are never a quantized weight or companion.
        if let Some(dt) = onnx_dtype(t.dtype()) {
            index.insert(name, (dt, t.shape().to_vec()));
        }
    }
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let read = |n: &str| -> Result<Bytes> { Ok(Bytes::copy_from_slice(st.tensor(n)?.data())) };
    Ok(scan(path, &index, &metadata, &read)?.layout())
}
