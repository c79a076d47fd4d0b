//! `trt-diff quantize`: a safetensors checkpoint in, a quantized safetensors checkpoint out, in the layouts
//! other tools load (bitsandbytes `Linear4bit` state dicts, ModelOpt / TensorRT-LLM NVFP4 and FP8 exports,
//! ComfyUI's NVFP4 and FP8 files: see [`super::comfy`]).
//!
//! The input is memory-mapped and read one tensor at a time; pages of a finished tensor are dropped from the
//! mapping, so resident memory stays near the largest tensor, not the file. The header is written first, so
//! every output size is planned from the input header (bitsandbytes' double-quantization offset, which
//! changes the length of its JSON state, is found in a first pass over that tensor's block maxima).
use super::bnb::{self, Absmax, Kind};
use super::comfy::{self, ComfyFormat};
use super::elem::{Elem, Values};
use super::int::{Bits, Granularity};
use super::{fp8, int, nvfp4};
use crate::fsutil::{AtomicFile, human_bytes};
use crate::with_values;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Nvfp4,
    Fp8,
    Mxfp8,
    Nf4,
    Fp4,
    Int8,
    Int4,
}

/// Whose loader the output is laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// ComfyUI's mixed-precision loader (nvfp4, fp8): `.comfy_quant` markers, swizzled NVFP4 block scales.
    Comfyui,
    /// ModelOpt / TensorRT-LLM exports (nvfp4, fp8; also mxfp8, int8, int4 in the same naming).
    Modelopt,
    /// bitsandbytes `Linear4bit` state dicts (nf4, fp4).
    Bnb,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Comfyui => "comfyui",
            Layout::Modelopt => "modelopt",
            Layout::Bnb => "bnb",
        }
    }
}

/// What each format allows for `--block-size` and what it uses without one (None: no blocks).
struct BlockRule {
    default: Option<usize>,
    allowed: &'static [usize],
    what: &'static str,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Nvfp4 => "nvfp4",
            Format::Fp8 => "fp8",
            Format::Mxfp8 => "mxfp8",
            Format::Nf4 => "nf4",
            Format::Fp4 => "fp4",
            Format::Int8 => "int8",
            Format::Int4 => "int4",
        }
    }

    fn block_rule(self) -> BlockRule {
        match self {
            Format::Nvfp4 => BlockRule {
                default: Some(16),
                allowed: &[16],
                what: "NVFP4 blocks are 16 elements",
            },
            Format::Mxfp8 => BlockRule {
                default: Some(32),
                allowed: &[32],
                what: "MX blocks are 32 elements",
            },
            Format::Fp8 => BlockRule {
                default: None,
                allowed: &[],
                what: "FP8 has one scale per tensor",
            },
            Format::Nf4 | Format::Fp4 => BlockRule {
                default: Some(64),
                allowed: &bnb::BLOCK_SIZES,
                what: "bitsandbytes accepts 32, 64, ..., 4096",
            },
            // INT8 without a block size is per output channel.
            Format::Int8 => BlockRule {
                default: None,
                allowed: &[],
                what: "any even block size",
            },
            Format::Int4 => BlockRule {
                default: Some(128),
                allowed: &[],
                what: "any even block size",
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub format: Format,
    /// None: the format's own (bnb for nf4/fp4, modelopt for the others).
    pub layout: Option<Layout>,
    pub block_size: Option<usize>,
    pub double_quant: bool,
    /// Globs on tensor names; empty: every floating-point `*.weight` of rank >= 2.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub progress: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct QuantizeReport {
    pub quantized: usize,
    pub passed_through: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
}

/// The options as recorded in the output header (`__metadata__["trt_diff.quantize"]`).
#[derive(Serialize)]
struct Recorded<'a> {
    format: Format,
    /// Only where it is not the format's default, so that default-layout files stay byte-identical.
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<Layout>,
    block_size: Option<usize>,
    double_quant: bool,
    include: &'a [String],
    exclude: &'a [String],
    producer: String,
}

struct OutTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: usize,
}

enum Action {
    Pass,
    Quantize {
        block: Option<usize>,
        nested_offset: Option<f32>,
    },
}

struct Plan {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    /// Byte range in the input's data section.
    range: (usize, usize),
    action: Action,
    outputs: Vec<OutTensor>,
}

fn out(name: String, dtype: &str, shape: Vec<usize>, elem_bytes: usize) -> OutTensor {
    let bytes = shape.iter().product::<usize>() * elem_bytes;
    OutTensor {
        name,
        dtype: dtype.to_string(),
        shape,
        bytes,
    }
}

fn patterns(globs: &[String], flag: &str) -> Result<Vec<glob::Pattern>> {
    globs
        .iter()
        .map(|g| {
            glob::Pattern::new(g)
                .with_context(|| format!("{flag} '{g}' is not a valid glob (use * ? [..])"))
        })
        .collect()
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    (shape.iter().product::<usize>() / cols.max(1), cols)
}

pub fn quantize_file(o: &QuantizeOptions) -> Result<QuantizeReport> {
    let t0 = Instant::now();
    let rule = o.format.block_rule();
    if let Some(b) = o.block_size {
        let ok = match o.format {
            Format::Fp8 => false,
            Format::Int8 | Format::Int4 => b >= 2 && b % 2 == 0,
            _ => rule.allowed.contains(&b),
        };
        if !ok {
            bail!(
                "--block-size {b} does not fit --format {}: {}",
                o.format.name(),
                rule.what
            );
        }
    }
    if o.double_quant && !matches!(o.format, Format::Nf4 | Format::Fp4) {
        bail!("--double-quant applies to nf4 and fp4 only (bitsandbytes' compress_statistics)");
    }
    let block = o.block_size.or(rule.default);
    let bnb_format = matches!(o.format, Format::Nf4 | Format::Fp4);
    let layout = o.layout.unwrap_or(if bnb_format {
        Layout::Bnb
    } else {
        Layout::Modelopt
    });
    let fits = match layout {
        Layout::Comfyui => matches!(o.format, Format::Nvfp4 | Format::Fp8),
        Layout::Bnb => bnb_format,
        Layout::Modelopt => !bnb_format,
    };
    if !fits {
        bail!(
            "--layout {} does not hold --format {}: comfyui takes nvfp4 and fp8, bnb takes nf4 and fp4, modelopt \
             the others",
            layout.name(),
            o.format.name()
        );
    }
    let comfy_format = match (layout, o.format) {
        (Layout::Comfyui, Format::Nvfp4) => Some(ComfyFormat::Nvfp4),
        (Layout::Comfyui, _) => Some(ComfyFormat::Fp8E4m3),
        _ => None,
    };
    let mut comfy_layers = BTreeMap::new();
    let include = patterns(&o.include, "--include")?;
    let exclude = patterns(&o.exclude, "--exclude")?;

    let file = std::fs::File::open(&o.input)
        .with_context(|| format!("cannot open '{}'; check the path", o.input.display()))?;
    // SAFETY: the file is only read; another process truncating it while we run would be a user error that
    // ends in SIGBUS, as with every mmap-based checkpoint reader.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map '{}' into memory", o.input.display()))?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
        anyhow::anyhow!(
            "'{}' is not a readable safetensors file ({e:?}); it may be truncated or not safetensors at all: \
             re-download or re-save it",
            o.input.display()
        )
    })?;
    let data_start = 8 + header_len;
    let infos = meta.tensors();

    let mut plans = Vec::new();
    for name in meta.offset_keys() {
        let info = infos[&name];
        let dtype = format!("{:?}", info.dtype);
        let shape = info.shape.clone();
        let explicit = include.iter().any(|p| p.matches(&name));
        let float = matches!(dtype.as_str(), "F32" | "F16" | "BF16");
        let selected = if include.is_empty() {
            name.ends_with(".weight") && shape.len() >= 2 && float
        } else {
            explicit
        } && !exclude.iter().any(|p| p.matches(&name));
        let mut plan = Plan {
            name: name.clone(),
            dtype: dtype.clone(),
            shape: shape.clone(),
            range: info.data_offsets,
            action: Action::Pass,
            outputs: vec![],
        };
        if selected {
            if !float {
                bail!(
                    "tensor '{name}' in '{}' is {dtype}; quantize reads F32, F16 and BF16 only: leave it out of \
                     --include or add --exclude '{name}'",
                    o.input.display()
                );
            }
            if shape.is_empty() || shape.contains(&0) {
                bail!(
                    "tensor '{name}' has shape {shape:?}: nothing to quantize; add --exclude '{name}'"
                );
            }
            let (_, cols) = rows_cols(&shape);
            if let (Some(b), false) = (block, matches!(o.format, Format::Nf4 | Format::Fp4))
                && !cols.is_multiple_of(b)
            {
                bail!(
                    "tensor '{name}' {shape:?}: its last dimension {cols} is not a multiple of the {} block \
                     size {b}; add --exclude '{name}' or pick another --block-size",
                    o.format.name()
                );
            }
            if let Some(cf) = comfy_format {
                // ComfyUI quantizes Linear weights: 2-D, named `<layer>.weight`; unpadded NVFP4 needs whole
                // 16-row groups (comfy-kitchen would pad them).
                let Some(layer) = name.strip_suffix(".weight") else {
                    bail!(
                        "tensor '{name}': ComfyUI's loader reads quantized `<layer>.weight` tensors only; add \
                         --exclude '{name}'"
                    );
                };
                if shape.len() != 2 || (cf == ComfyFormat::Nvfp4 && !shape[0].is_multiple_of(16)) {
                    bail!(
                        "tensor '{name}' {shape:?}: ComfyUI's {} layout needs a 2-D weight{}; add --exclude \
                         '{name}'",
                        cf.name(),
                        if cf == ComfyFormat::Nvfp4 {
                            " with a multiple of 16 rows"
                        } else {
                            ""
                        }
                    );
                }
                comfy_layers.insert(layer.to_string(), cf);
            }
            let nested_offset = if o.double_quant {
                let v = tensor_values(&map, data_start, &plan)?;
                let am = with_values!(&v, |s| bnb::block_absmax_all(s, block.unwrap_or(64)));
                drop_pages(&map, data_start, plan.range);
                Some(bnb::mean(&am))
            } else {
                None
            };
            plan.action = Action::Quantize {
                block,
                nested_offset,
            };
            plan.outputs = match comfy_format {
                Some(cf) => comfy_outputs(cf, &plan),
                None => outputs_of(o.format, &plan, block, nested_offset),
            };
        } else {
            plan.outputs = vec![OutTensor {
                name: name.clone(),
                dtype: dtype.clone(),
                shape: shape.clone(),
                bytes: info.data_offsets.1 - info.data_offsets.0,
            }];
        }
        plans.push(plan);
    }

    // Header: the input's metadata plus ours; offsets in the order the data is written.
    let mut metadata: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    metadata.insert(
        "trt_diff.quantize".into(),
        serde_json::to_string(&Recorded {
            format: o.format,
            layout: comfy_format.map(|_| layout),
            block_size: block,
            double_quant: o.double_quant,
            include: &o.include,
            exclude: &o.exclude,
            producer: format!("trt-diff {}", env!("CARGO_PKG_VERSION")),
        })?,
    );
    if comfy_format.is_some() {
        metadata.insert(
            comfy::METADATA_KEY.into(),
            comfy::metadata_json(&comfy_layers),
        );
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(&metadata)?);
    let mut offset = 0usize;
    for t in plans.iter().flat_map(|p| &p.outputs) {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes]}),
        );
        offset += t.bytes;
    }
    // Keys sorted at every level, whatever serde_json's `preserve_order` feature (which a dependency may enable):
    // the header's bytes must not depend on the build.
    let mut header = serde_json::Value::Object(header);
    sort_keys(&mut header);
    let mut hbytes = serde_json::to_vec(&header)?;
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }

    let mut w = AtomicFile::create(&o.output)?;
    let werr = |e: std::io::Error| anyhow::anyhow!("writing '{}' failed: {e}", o.output.display());
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(&hbytes).map_err(werr)?;
    let total: u64 = plans.iter().map(|p| (p.range.1 - p.range.0) as u64).sum();
    let bar = progress_bar(o.progress, total);
    let mut report = QuantizeReport {
        input_bytes: map.len() as u64,
        ..Default::default()
    };
    for p in &plans {
        bar.set_message(p.name.clone());
        match &p.action {
            Action::Pass => {
                w.write_all(&map[data_start + p.range.0..data_start + p.range.1])
                    .map_err(werr)?;
                report.passed_through += 1;
            }
            Action::Quantize {
                block,
                nested_offset,
            } => {
                let v = tensor_values(&map, data_start, p)?;
                let parts = match comfy_format {
                    Some(cf) => comfy_tensor(cf, &v, p),
                    None => quantize_tensor(o.format, &v, p, *block, *nested_offset),
                };
                for (t, bytes) in p.outputs.iter().zip(&parts) {
                    if t.bytes != bytes.len() {
                        bail!(
                            "internal error: '{}' planned {} bytes, produced {}",
                            t.name,
                            t.bytes,
                            bytes.len()
                        );
                    }
                    w.write_all(bytes).map_err(werr)?;
                }
                report.quantized += 1;
            }
        }
        drop_pages(&map, data_start, p.range);
        bar.inc((p.range.1 - p.range.0) as u64);
    }
    bar.finish_and_clear();
    w.commit()?;
    report.output_bytes = std::fs::metadata(&o.output).map(|m| m.len()).unwrap_or(0);
    report.seconds = t0.elapsed().as_secs_f64();
    tracing::debug!(
        "quantized {} tensors, {} -> {}",
        report.quantized,
        human_bytes(report.input_bytes),
        human_bytes(report.output_bytes)
    );
    Ok(report)
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {wide_msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn tensor_values<'a>(map: &'a [u8], data_start: usize, p: &Plan) -> Result<Values<'a>> {
    let bytes = &map[data_start + p.range.0..data_start + p.range.1];
    Values::from_bytes(&p.dtype, bytes)
        .with_context(|| format!("tensor '{}': dtype {} unreadable", p.name, p.dtype))
}

/// Tells the kernel the pages of a finished tensor are not needed; they are reloaded from the file if read
/// again. Keeps resident memory near one tensor instead of the whole file.
fn drop_pages(map: &memmap2::Mmap, data_start: usize, range: (usize, usize)) {
    let (a, b) = (data_start + range.0, data_start + range.1);
    if b > a {
        // SAFETY: a read-only, file-backed shared mapping: MADV_DONTNEED only evicts clean pages, which read
        // back identical from the file. Failure only costs memory, so it is ignored.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

fn outputs_of(
    f: Format,
    p: &Plan,
    block: Option<usize>,
    nested_offset: Option<f32>,
) -> Vec<OutTensor> {
    let n: usize = p.shape.iter().product();
    let (_, cols) = rows_cols(&p.shape);
    let lead = &p.shape[..p.shape.len() - 1];
    let with_last = |last: usize| -> Vec<usize> { lead.iter().copied().chain([last]).collect() };
    let name = &p.name;
    let scale = format!("{name}_scale");
    match f {
        Format::Nvfp4 => vec![
            out(name.clone(), "U8", with_last(cols / 2), 1),
            out(scale, "F8_E4M3", with_last(cols / nvfp4::BLOCK), 1),
            out(format!("{name}_scale_2"), "F32", vec![], 4),
        ],
        Format::Fp8 => vec![
            out(name.clone(), "F8_E4M3", p.shape.clone(), 1),
            out(scale, "F32", vec![], 4),
        ],
        Format::Mxfp8 => vec![
            out(name.clone(), "F8_E4M3", p.shape.clone(), 1),
            out(scale, "U8", with_last(cols / fp8::MX_BLOCK), 1),
        ],
        Format::Int8 => {
            let s = match block {
                Some(b) => with_last(cols / b),
                None => with_last(1),
            };
            vec![
                out(name.clone(), "I8", p.shape.clone(), 1),
                out(scale, "F32", s, 4),
            ]
        }
        Format::Int4 => {
            let b = block.unwrap_or(128);
            vec![
                out(name.clone(), "U8", with_last(cols / 2), 1),
                out(scale, "F32", with_last(cols / b), 4),
            ]
        }
        Format::Nf4 | Format::Fp4 => {
            let kind = if f == Format::Nf4 {
                Kind::Nf4
            } else {
                Kind::Fp4
            };
            let bs = block.unwrap_or(64);
            let blocks = n.div_ceil(bs);
            let mut v = vec![out(name.clone(), "U8", vec![n.div_ceil(2), 1], 1)];
            match nested_offset {
                None => v.push(out(format!("{name}.absmax"), "F32", vec![blocks], 4)),
                Some(_) => v.push(out(format!("{name}.absmax"), "U8", vec![blocks], 1)),
            }
            v.push(out(format!("{name}.quant_map"), "F32", vec![16], 4));
            if nested_offset.is_some() {
                v.push(out(
                    format!("{name}.nested_absmax"),
                    "F32",
                    vec![blocks.div_ceil(bnb::NESTED_BLOCK)],
                    4,
                ));
                v.push(out(format!("{name}.nested_quant_map"), "F32", vec![256], 4));
            }
            let q = bnb::Quant4 {
                kind,
                blocksize: bs,
                packed: vec![],
                absmax: match nested_offset {
                    Some(offset) => Absmax::Nested(bnb::Nested {
                        codes: vec![],
                        absmax: vec![],
                        offset,
                    }),
                    None => Absmax::Plain(vec![]),
                },
            };
            let json = bnb::quant_state_json(&q, torch_name(&p.dtype), &p.shape);
            v.push(out(
                format!("{name}.quant_state.bitsandbytes__{}", kind.name()),
                "U8",
                vec![json.len()],
                1,
            ));
            v
        }
    }
}

/// ComfyUI's tensors for weight `<layer>.weight`, in the order [`comfy_tensor`] writes them.
fn comfy_outputs(f: ComfyFormat, p: &Plan) -> Vec<OutTensor> {
    let (rows, cols) = (p.shape[0], p.shape[1]);
    let name = &p.name;
    let layer = name.strip_suffix(".weight").unwrap_or(name);
    let marker = comfy::marker_json(f);
    let mut v = match f {
        ComfyFormat::Nvfp4 => {
            let (pr, pc) = comfy::swizzled_shape(rows, cols / nvfp4::BLOCK);
            vec![
                out(name.clone(), "U8", vec![rows, cols / 2], 1),
                out(format!("{name}_scale"), "F8_E4M3", vec![pr, pc], 1),
                out(format!("{name}_scale_2"), "F32", vec![], 4),
            ]
        }
        ComfyFormat::Fp8E4m3 => vec![
            out(name.clone(), "F8_E4M3", p.shape.clone(), 1),
            out(format!("{name}_scale"), "F32", vec![], 4),
        ],
    };
    v.push(out(
        format!("{layer}{}", comfy::MARKER),
        "U8",
        vec![marker.len()],
        1,
    ));
    v
}

/// The bytes of [`comfy_outputs`]: the same quantization as the ModelOpt layout, NVFP4 re-packed high nibble
/// first with its block scales swizzled.
fn comfy_tensor(f: ComfyFormat, v: &Values, p: &Plan) -> Vec<Vec<u8>> {
    let (rows, cols) = (p.shape[0], p.shape[1]);
    let mut parts = match f {
        ComfyFormat::Nvfp4 => {
            let q = with_values!(v, |s| nvfp4::quantize(s));
            vec![
                comfy::swap_nibbles(&q.packed),
                comfy::swizzle(&q.block_scales, rows, cols / nvfp4::BLOCK),
                f32_bytes(&[q.global_scale]),
            ]
        }
        ComfyFormat::Fp8E4m3 => {
            let (codes, s) = with_values!(v, |x| fp8::quantize_fp8(x));
            vec![codes, f32_bytes(&[s])]
        }
    };
    parts.push(comfy::marker_json(f).into_bytes());
    parts
}

fn torch_name(dtype: &str) -> &'static str {
    match dtype {
        "F16" => <half::f16 as Elem>::TORCH,
        "BF16" => <half::bf16 as Elem>::TORCH,
        _ => <f32 as Elem>::TORCH,
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// The output tensors' bytes, in the order `outputs_of` lists them.
fn quantize_tensor(
    f: Format,
    v: &Values,
    p: &Plan,
    block: Option<usize>,
    nested_offset: Option<f32>,
) -> Vec<Vec<u8>> {
    let (_, cols) = rows_cols(&p.shape);
    match f {
        Format::Nvfp4 => {
            let q = with_values!(v, |s| nvfp4::quantize(s));
            vec![q.packed, q.block_scales, f32_bytes(&[q.global_scale])]
        }
        Format::Fp8 => {
            let (codes, s) = with_values!(v, |x| fp8::quantize_fp8(x));
            vec![codes, f32_bytes(&[s])]
        }
        Format::Mxfp8 => {
            let (codes, scales) = with_values!(v, |x| fp8::quantize_mxfp8(x));
            vec![codes, scales]
        }
        Format::Int8 | Format::Int4 => {
            let bits = if f == Format::Int8 {
                Bits::Int8
            } else {
                Bits::Int4
            };
            let g = match (f, block) {
                (_, Some(b)) => Granularity::Block(b),
                (Format::Int4, None) => Granularity::Block(128),
                _ => Granularity::Channel,
            };
            let (q, s) = with_values!(v, |x| int::quantize(x, cols, g, bits));
            let data = if bits == Bits::Int8 {
                bytemuck::cast_slice(&q).to_vec()
            } else {
                int::pack_int4(&q)
            };
            vec![data, f32_bytes(&s)]
        }
        Format::Nf4 | Format::Fp4 => {
            let kind = if f == Format::Nf4 {
                Kind::Nf4
            } else {
                Kind::Fp4
            };
            let bs = block.unwrap_or(64);
            let (packed, absmax) = with_values!(v, |x| bnb::quantize_fast(x, kind, bs));
            let mut q = bnb::Quant4 {
                kind,
                blocksize: bs,
                packed,
                absmax: Absmax::Plain(vec![]),
            };
            let mut parts = vec![];
            match nested_offset {
                None => parts.push(f32_bytes(&absmax)),
                Some(off) => {
                    let nested = bnb::nest(&absmax, Some(off));
                    parts.push(nested.codes.clone());
                    q.absmax = Absmax::Nested(nested);
                }
            }
            let json = bnb::quant_state_json(&q, torch_name(&p.dtype), &p.shape);
            let mut out = vec![std::mem::take(&mut q.packed)];
            out.append(&mut parts);
            out.push(f32_bytes(&kind.code()));
            if let Absmax::Nested(n) = &q.absmax {
                out.push(f32_bytes(&n.absmax));
                out.push(f32_bytes(&bnb::dynamic_map()));
            }
            out.push(json.into_bytes());
            out
        }
    }
}

/// Reads a tensor of a safetensors file written by `quantize` (or any other) as f32 values, dequantizing the
/// formats above from their companion tensors. Used by tests and `inspect`.
pub fn dequantize_named(path: &Path, name: &str) -> Result<Vec<f32>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    // SAFETY: read-only map of a file nothing else writes while we read it.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map '{}'", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
        anyhow::anyhow!(
            "'{}' is not a readable safetensors file ({e:?})",
            path.display()
        )
    })?;
    dequantize_tensor(&st, path, name)
}

/// A tensor as [`dequantize_from`] looks it up: its safetensors dtype name ("U8", "F8_E4M3", ...) and bytes.
pub struct RawTensor<D> {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: D,
}

/// [`dequantize_named`] on an already opened file (`path` only names it in errors).
pub fn dequantize_tensor(
    st: &safetensors::SafeTensors<'_>,
    path: &Path,
    name: &str,
) -> Result<Vec<f32>> {
    let get = |n: &str| {
        st.tensor(n).ok().map(|t| RawTensor {
            dtype: format!("{:?}", t.dtype()),
            shape: t.shape().to_vec(),
            data: t.data(),
        })
    };
    dequantize_from(&get, path, name)
}

/// Tensor `name` as f32 values, its companions looked up through `get` (a safetensors file, or a checkpoint's
/// index). Every size that the companion tensors and the `quant_state` JSON declare is checked against the
/// tensors' real lengths first: a damaged or hand-made file gives an error, not a panic or an allocation its data
/// cannot fill.
pub fn dequantize_from<D: AsRef<[u8]>>(
    get: &dyn Fn(&str) -> Option<RawTensor<D>>,
    path: &Path,
    name: &str,
) -> Result<Vec<f32>> {
    let p = path.display();
    let f32v = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let damaged = |what: String| -> anyhow::Error {
        anyhow::anyhow!(
            "'{p}': tensor '{name}' is damaged: {what}; re-quantize the checkpoint with `trt-diff quantize`"
        )
    };
    let main = get(name).with_context(|| format!("no tensor '{name}' in '{p}'"))?;
    for kind in [Kind::Nf4, Kind::Fp4] {
        if let Some(js) = get(&format!("{name}.quant_state.bitsandbytes__{}", kind.name())) {
            let state: serde_json::Value = serde_json::from_slice(js.data.as_ref())
                .map_err(|e| damaged(format!("its quant_state is not JSON ({e})")))?;
            let bs = state["blocksize"]
                .as_u64()
                .ok_or_else(|| damaged("quant_state without blocksize".into()))?;
            let bs = usize::try_from(bs)
                .ok()
                .filter(|b| bnb::BLOCK_SIZES.contains(b))
                .ok_or_else(|| {
                    damaged(format!(
                        "quant_state blocksize {bs} is not one of {:?}",
                        bnb::BLOCK_SIZES
                    ))
                })?;
            let dims = state["shape"]
                .as_array()
                .ok_or_else(|| damaged("quant_state without shape".into()))?;
            let n = dims
                .iter()
                .try_fold(1usize, |acc, d| {
                    d.as_u64()
                        .and_then(|d| usize::try_from(d).ok())
                        .and_then(|d| acc.checked_mul(d))
                })
                .ok_or_else(|| damaged(format!("quant_state shape {dims:?} is not a shape")))?;
            let packed = main.data.as_ref();
            if n.div_ceil(2) > packed.len() {
                bail!(damaged(format!(
                    "quant_state shape {dims:?} holds {n} values, the packed data only {}",
                    packed.len() * 2
                )));
            }
            let blocks = n.div_ceil(bs);
            let absmax_t = get(&format!("{name}.absmax"))
                .ok_or_else(|| damaged(format!("'{name}.absmax' is missing")))?;
            let absmax = match get(&format!("{name}.nested_absmax")) {
                Some(na) => {
                    let codes = absmax_t.data.as_ref().to_vec();
                    let second = f32v(na.data.as_ref());
                    if codes.len() < blocks
                        || second.len() < codes.len().div_ceil(bnb::NESTED_BLOCK)
                    {
                        bail!(damaged(format!(
                            "{} absmax codes and {} nested absmax values for {blocks} blocks",
                            codes.len(),
                            second.len()
                        )));
                    }
                    Absmax::Nested(bnb::Nested {
                        codes,
                        absmax: second,
                        offset: state["nested_offset"]
                            .as_f64()
                            .ok_or_else(|| damaged("quant_state without nested_offset".into()))?
                            as f32,
                    })
                }
                None => {
                    let v = f32v(absmax_t.data.as_ref());
                    if v.len() < blocks {
                        bail!(damaged(format!(
                            "{} absmax values for {blocks} blocks",
                            v.len()
                        )));
                    }
                    Absmax::Plain(v)
                }
            };
            let q = bnb::Quant4 {
                kind,
                blocksize: bs,
                packed: packed.to_vec(),
                absmax,
            };
            return Ok(q.dequantize(n));
        }
    }
    let scale = get(&format!("{name}_scale"));
    let e4m3 = |b: u8| super::minifloat::E4M3FN.decode(b);
    // Elements per scale (the last scale takes any remainder); the scale tensor must not be empty nor longer
    // than the data.
    let per_scale = |n: usize, scales: usize| -> Result<usize> {
        if scales == 0 || scales > n.max(1) {
            bail!(damaged(format!("{n} values for {scales} scales")));
        }
        Ok((n / scales).max(1))
    };
    let at = |i: usize, per: usize, len: usize| (i / per).min(len.saturating_sub(1));
    Ok(match (main.dtype.as_str(), scale) {
        ("U8", Some(s)) if get(&format!("{name}_scale_2")).is_some() => {
            let s2 = get(&format!("{name}_scale_2"))
                .map(|t| f32v(t.data.as_ref()))
                .unwrap_or_default();
            let Some(&sw) = s2.first() else {
                bail!(damaged(format!("'{name}_scale_2' holds no f32 value")));
            };
            let blocks = (main.data.as_ref().len() * 2).div_ceil(nvfp4::BLOCK);
            let layer = name.strip_suffix(".weight").unwrap_or(name);
            if get(&format!("{layer}{}", comfy::MARKER)).is_some() {
                // ComfyUI's: high nibble first, block scales swizzled.
                let (rows, cols) = match main.shape[..] {
                    [r, c] if (c * 2).is_multiple_of(nvfp4::BLOCK) => (r, c * 2),
                    _ => bail!(damaged(format!(
                        "a ComfyUI NVFP4 weight is [rows, cols / 2] with whole 16-value blocks, this is {:?}",
                        main.shape
                    ))),
                };
                let scales = comfy::unswizzle(s.data.as_ref(), rows, cols / nvfp4::BLOCK)
                    .map_err(|e| damaged(e.to_string()))?;
                nvfp4::dequantize_signed_zero(&comfy::swap_nibbles(main.data.as_ref()), &scales, sw)
            } else {
                if s.data.as_ref().len() < blocks {
                    bail!(damaged(format!(
                        "{} block scales for {blocks} NVFP4 blocks",
                        s.data.as_ref().len()
                    )));
                }
                nvfp4::dequantize(main.data.as_ref(), s.data.as_ref(), sw)
            }
        }
        ("F8_E4M3", Some(s)) if s.dtype == "U8" => {
            let per = per_scale(main.data.as_ref().len(), s.data.as_ref().len())?;
            main.data
                .as_ref()
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    e4m3(c) * fp8::e8m0_decode(s.data.as_ref()[at(i, per, s.data.as_ref().len())])
                })
                .collect()
        }
        ("F8_E4M3", Some(s)) => {
            let Some(&sc) = f32v(s.data.as_ref()).first() else {
                bail!(damaged(format!("'{name}_scale' holds no f32 value")));
            };
            main.data.as_ref().iter().map(|&c| e4m3(c) * sc).collect()
        }
        ("I8", Some(s)) => {
            let sc = f32v(s.data.as_ref());
            let per = per_scale(main.data.as_ref().len(), sc.len())?;
            main.data
                .as_ref()
                .iter()
                .enumerate()
                .map(|(i, &c)| c as i8 as f32 * sc[at(i, per, sc.len())])
                .collect()
        }
        ("U8", Some(s)) => {
            let sc = f32v(s.data.as_ref());
            let n = main.data.as_ref().len() * 2;
            let per = per_scale(n, sc.len())?;
            int::unpack_int4(main.data.as_ref(), n)
                .iter()
                .enumerate()
                .map(|(i, &q)| q as f32 * sc[at(i, per, sc.len())])
                .collect()
        }
        (dt, _) => match Values::from_bytes(dt, main.data.as_ref()) {
            Some(v) => v.to_f32(),
            None => {
                bail!(
                    "'{p}': tensor '{name}' is {dt} without a scale: not a format trt-diff dequantizes"
                )
            }
        },
    })
}

fn sort_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.sort_keys();
            m.values_mut().for_each(sort_keys);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(sort_keys),
        _ => {}
    }
}
