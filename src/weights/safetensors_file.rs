//! Memory-mapped safetensors checkpoints, one file or a sharded folder (diffusers' `*-0000N-of-0000M` shards),
//! read without copying: each tensor is a `Bytes` slice of the mapping, so a graph emitter can hand it straight to
//! the external-data writer. A tensor's pages leave the resident set when its last `Bytes` is dropped (once
//! written), which keeps the resident set of a 24 GB export small.
use super::prequant::{self, Prequant, Scan, SourceLayout, onnx_dtype};
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Reads ranges of the mappings into the page cache on a background thread (`MADV_WILLNEED` blocks while it
/// submits the reads, so it must not run on the caller's thread).
struct Prefetcher {
    tx: std::sync::mpsc::Sender<(Arc<Mapped>, usize, usize)>,
}

impl Prefetcher {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<(Arc<Mapped>, usize, usize)>();
        std::thread::spawn(move || {
            // Ends when the checkpoint (the sender) is dropped.
            for (map, start, end) in rx {
                let mut a = start;
                while a < end {
                    let b = (a + (32 << 20)).min(end);
                    let _ = map.map.advise_range(memmap2::Advice::WillNeed, a, b - a);
                    a = b;
                }
            }
        });
        Prefetcher { tx }
    }
}

/// A checkpoint file and its read-only mapping (the file for page-cache hints).
struct Mapped {
    map: memmap2::Mmap,
    file: std::fs::File,
    /// The file is too big to stay cached (see [`crate::fsutil::crowds_page_cache`]): a released tensor's pages
    /// also leave the page cache.
    evict: bool,
}

/// One tensor's bytes in a mapping. When the last `Bytes` pointing at it is dropped (e.g. by the external-data
/// writer thread, once written), its whole pages leave this process's resident set: they read back from the file
/// if touched again, so memory stays at about the tensors in use.
struct TensorPages {
    map: Arc<Mapped>,
    start: usize,
    end: usize,
}
impl AsRef<[u8]> for TensorPages {
    fn as_ref(&self) -> &[u8] {
        &self.map.map[self.start..self.end]
    }
}
impl Drop for TensorPages {
    fn drop(&mut self) {
        release_range(&self.map.map, self.start, self.end);
        if self.map.evict {
            crate::fsutil::drop_cached(&self.map.file, self.start as u64, self.end as u64);
        }
    }
}

/// MADV_DONTNEED on the whole pages inside `[start, end)` of a read-only file mapping (neighbours may be in use).
fn release_range(map: &memmap2::Mmap, start: usize, end: usize) {
    let page = 4096;
    let a = start.next_multiple_of(page);
    let b = end / page * page;
    if b > a {
        // SAFETY: a read-only, file-backed mapping: MADV_DONTNEED evicts clean pages, which read back identical
        // from the file. Failure only costs memory, so it is ignored.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

#[derive(Clone)]
struct Entry {
    file: usize,
    dtype: DataType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// One tensor: its ONNX element type, shape and raw little-endian bytes (a slice of the mapping).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
    /// A weight read from a pre-quantized checkpoint: `data` holds its dequantized f32 values, this its stored
    /// codes and scales where they map exactly onto a Q/DQ format ([`prequant`]).
    pub quant: Option<Arc<Prequant>>,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32 (F32, F16 and BF16 tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = &self.data[..];
        Ok(match self.dtype {
            DataType::FLOAT => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            // Widened in parallel, 64 Ki values a task: full-size exports widen gigabytes of weights. f16 through
            // half's slice conversion (F16C, 8 at a time) rather than a dispatched call per element.
            DataType::FLOAT16 => widen(d, |b, o| {
                use half::slice::HalfFloatSliceExt;
                match bytemuck::try_cast_slice::<u8, half::f16>(b) {
                    Ok(h) => h.convert_to_f32_slice(o),
                    // A tensor at an odd offset of the file.
                    Err(_) => {
                        let h: Vec<half::f16> = b
                            .chunks_exact(2)
                            .map(|p| half::f16::from_le_bytes([p[0], p[1]]))
                            .collect();
                        h.convert_to_f32_slice(o)
                    }
                }
            }),
            DataType::BFLOAT16 => widen(d, |b, o| {
                for (v, p) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *v = f32::from_bits((u16::from_le_bytes([p[0], p[1]]) as u32) << 16);
                }
            }),
            other => bail!(
                "tensor '{}' is {other}; only F32, F16 and BF16 tensors can be read as floats",
                self.name
            ),
        })
    }
}

/// 16-bit little-endian values `d` widened to f32 by `convert(bytes, out)`, in parallel chunks.
fn widen(d: &[u8], convert: impl Fn(&[u8], &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; d.len() / 2];
    out.par_chunks_mut(1 << 16)
        .zip(d.par_chunks(1 << 17))
        .for_each(|(o, b)| convert(b, o));
    out
}

/// How one tensor of a renamed view ([`Checkpoint::renamed`]) comes from the checkpoint: single-file checkpoints
/// keep the same weights under other names, some fused or reordered.
#[derive(Clone, Debug)]
pub enum Derived {
    /// The tensor as it is.
    Same(String),
    /// Row block `index` of `parts` equal blocks (q, k or v of a fused qkv projection): zero-copy.
    Rows {
        name: String,
        index: usize,
        parts: usize,
    },
    /// The two row halves swapped (an AdaLN's shift|scale as scale|shift): the one copy.
    SwapHalves(String),
    /// A tensor the file leaves out (the identity projection diffusers gives SD3's CLIP-L).
    Made(Tensor),
}

pub struct Checkpoint {
    /// What the user named (a file or a folder), for messages.
    pub path: PathBuf,
    files: Vec<(PathBuf, Arc<Mapped>)>,
    index: BTreeMap<String, Entry>,
    prefetcher: std::sync::OnceLock<std::sync::Mutex<Prefetcher>>,
    /// Tensors that replace the file's (LoRA-merged weights): same names and shapes, any float type.
    overrides: BTreeMap<String, Tensor>,
    /// The files' `__metadata__` string maps, merged.
    metadata: BTreeMap<String, String>,
    /// Pre-quantized weights (read as their dequantized values) and their companions (hidden).
    prequant: Scan,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, or every `.safetensors` file of a folder (a sharded diffusers component such
    /// as `transformer/`). Tensor names must be unique across shards.
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list '{}'", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!(
                    "'{}' holds no .safetensors file: point at the checkpoint file or at the folder of its shards",
                    path.display()
                );
            }
            v
        } else {
            vec![path.to_path_buf()]
        };
        let mut ck = Checkpoint {
            path: path.to_path_buf(),
            files: Vec::new(),
            index: BTreeMap::new(),
            prefetcher: std::sync::OnceLock::new(),
            overrides: BTreeMap::new(),
            metadata: BTreeMap::new(),
            prequant: Scan::default(),
        };
        // Judged on the whole checkpoint: the shards of a big model are read one after another.
        let total: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let evict = crate::fsutil::crowds_page_cache(total);
        for f in files {
            ck.add_file(&f, evict)?;
        }
        ck.prequant = prequant::scan(&ck.path, &ck.raw_index(), &ck.metadata, &|n| {
            ck.get_raw(n).map(|t| t.data)
        })?;
        if ck.prequant.layout() != SourceLayout::Plain {
            tracing::info!(
                "'{}': {} pre-quantized weights in {} layout",
                ck.path.display(),
                ck.prequant.entries.len(),
                ck.prequant.layout().name()
            );
        }
        Ok(ck)
    }

    fn add_file(&mut self, path: &Path, evict: bool) -> Result<()> {
        let file = std::fs::File::open(path).with_context(|| {
            format!(
                "cannot open checkpoint '{}'; check the path",
                path.display()
            )
        })?;
        // SAFETY: read-only map; another process truncating the file while we read it is a user error that ends
        // in SIGBUS, as with every mmap-based checkpoint reader.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map '{}' into memory", path.display()))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a readable safetensors file ({e:?}): it is truncated or not safetensors; re-download \
                 or re-save it",
                path.display()
            )
        })?;
        if let Some(m) = meta.metadata() {
            self.metadata
                .extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let data_start = 8 + header_len;
        let fi = self.files.len();
        for (name, info) in meta.tensors() {
            let Some(dtype) = onnx_dtype(info.dtype) else {
                bail!(
                    "'{}': tensor '{name}' has dtype {:?}, which trt-diff does not read",
                    path.display(),
                    info.dtype
                );
            };
            let (a, b) = info.data_offsets;
            let (start, end) = (data_start + a, data_start + b);
            if end > map.len() {
                bail!(
                    "'{}': tensor '{name}' needs bytes up to {end}, the file has {}: truncated; re-download it",
                    path.display(),
                    map.len()
                );
            }
            let entry = Entry {
                file: fi,
                dtype,
                shape: info.shape.clone(),
                start,
                end,
            };
            if let Some(prev) = self.index.insert(name.clone(), entry) {
                bail!(
                    "tensor '{name}' is in both '{}' and '{}': mixed checkpoints in one folder? keep one model's \
                     shards only",
                    self.files[prev.file].0.display(),
                    path.display()
                );
            }
        }
        self.files
            .push((path.to_path_buf(), Arc::new(Mapped { map, file, evict })));
        Ok(())
    }

    /// The safetensors `__metadata__` entries (e.g. diffusers' `lora_adapter_metadata`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The model's tensor names (a pre-quantized checkpoint's scales and markers left out).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index
            .keys()
            .filter(|n| !self.prequant.companions.contains(*n))
            .map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) && !self.prequant.companions.contains(name)
    }

    /// The shape a model sees: a pre-quantized weight's logical shape.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        if let Some(e) = self.prequant.entries.get(name) {
            return Some(e.shape.as_slice());
        }
        if self.prequant.companions.contains(name) {
            return None;
        }
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    pub fn dtype(&self, name: &str) -> Option<DataType> {
        if let Some(t) = self.overrides.get(name) {
            return Some(t.dtype);
        }
        if self.prequant.entries.contains_key(name) {
            return Some(DataType::FLOAT);
        }
        if self.prequant.companions.contains(name) {
            return None;
        }
        self.index.get(name).map(|e| e.dtype)
    }

    /// Whose layout the checkpoint's quantized weights are in (`plain` when none are).
    pub fn source_layout(&self) -> SourceLayout {
        self.prequant.layout()
    }

    /// How many weights are stored quantized.
    pub fn prequantized(&self) -> usize {
        self.prequant.entries.len()
    }

    fn raw_index(&self) -> prequant::Index {
        self.index
            .iter()
            .map(|(n, e)| (n.clone(), (e.dtype, e.shape.clone())))
            .collect()
    }

    /// Replaces tensor `t.name` of the checkpoint with `t` for every later [`Checkpoint::get`] (weights with a
    /// LoRA merged in); the name must exist and the shape stay.
    pub fn set_override(&mut self, t: Tensor) -> Result<()> {
        let Some(shape) = self.shape(&t.name) else {
            bail!(
                "checkpoint '{}' has no tensor '{}' to replace",
                self.path.display(),
                t.name
            );
        };
        if shape != t.shape.as_slice() {
            bail!(
                "checkpoint '{}': '{}' is {:?}; its replacement is {:?}",
                self.path.display(),
                t.name,
                shape,
                t.shape
            );
        }
        self.overrides.insert(t.name.clone(), t);
        Ok(())
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.index.values().map(|e| (e.end - e.start) as u64).sum()
    }

    /// The tensor `name`, zero-copy (a pre-quantized weight: its dequantized f32 values, with its stored form in
    /// [`Tensor::quant`]); the error names the checkpoint.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.overrides.get(name) {
            return Ok(t.clone());
        }
        if let Some(e) = self.prequant.entries.get(name) {
            let (values, quant) = prequant::decode(&self.path, name, e, &self.raw_index(), &|n| {
                self.get_raw(n).map(|t| t.data)
            })?;
            return Ok(Tensor {
                name: name.to_string(),
                dtype: DataType::FLOAT,
                shape: e.shape.clone(),
                data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&values).to_vec()),
                quant: quant.map(Arc::new),
            });
        }
        if self.prequant.companions.contains(name) {
            bail!(
                "checkpoint '{}': '{name}' is a quantization companion (scale or marker), not a model tensor",
                self.path.display()
            );
        }
        self.get_raw(name)
    }

    /// The stored tensor `name`, whatever it is.
    fn get_raw(&self, name: &str) -> Result<Tensor> {
        let Some(e) = self.index.get(name) else {
            bail!(
                "checkpoint '{}' has no tensor '{name}': wrong model, or a layout trt-diff does not know",
                self.path.display()
            );
        };
        let mapped = &self.files[e.file].1;
        let map = &mapped.map;
        // Map the tensor's pages in one call rather than one fault per 64 KiB (ignored where unsupported); with
        // [`Checkpoint::prefetch_prefix`] ahead of time they are already in the page cache.
        if e.end > e.start {
            let _ = map.advise_range(memmap2::Advice::PopulateRead, e.start, e.end - e.start);
        }
        Ok(Tensor {
            name: name.to_string(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: Bytes::from_owner(TensorPages {
                map: mapped.clone(),
                start: e.start,
                end: e.end,
            }),
            quant: None,
        })
    }

    /// Like [`Checkpoint::get`], also checking the shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            bail!(
                "checkpoint '{}': tensor '{name}' has shape {:?}, the model config expects {shape:?}: the config \
                 does not match the weights",
                self.path.display(),
                t.shape
            );
        }
        Ok(t)
    }

    /// A view of this checkpoint under other names: each `(name, how)` makes tensor `name`, the rest is left
    /// out. Shares the mapping (only [`Derived::SwapHalves`] and [`Derived::Made`] hold copies); errors name the
    /// file and the missing or misshapen tensor.
    pub fn renamed(&self, table: Vec<(String, Derived)>) -> Result<Checkpoint> {
        if !self.prequant.entries.is_empty() {
            bail!(
                "'{}' holds pre-quantized weights in a single-file layout, which trt-diff does not read: use the \
                 diffusers folder of the same model, or its bf16/fp16 file",
                self.path.display()
            );
        }
        let entry = |name: &str| -> Result<&Entry> {
            self.index.get(name).with_context(|| {
                format!(
                    "'{}' has no tensor '{name}': it is not the single-file layout its other keys suggest \
                     (truncated or merged from another model?)",
                    self.path.display()
                )
            })
        };
        let mut view = Checkpoint {
            path: self.path.clone(),
            files: self.files.clone(),
            index: BTreeMap::new(),
            prefetcher: std::sync::OnceLock::new(),
            overrides: BTreeMap::new(),
            metadata: self.metadata.clone(),
            prequant: Scan::default(),
        };
        for (name, how) in table {
            let e = match how {
                Derived::Same(src) => entry(&src)?.clone(),
                Derived::Rows {
                    name: src,
                    index,
                    parts,
                } => {
                    let e = entry(&src)?;
                    let rows = e.shape.first().copied().unwrap_or(0);
                    if parts == 0 || index >= parts || rows % parts != 0 {
                        bail!(
                            "'{}': tensor '{src}' has {rows} rows, which do not split into {parts} equal blocks",
                            self.path.display()
                        );
                    }
                    let block = (e.end - e.start) / parts;
                    let mut shape = e.shape.clone();
                    shape[0] = rows / parts;
                    Entry {
                        start: e.start + index * block,
                        end: e.start + (index + 1) * block,
                        shape,
                        ..e.clone()
                    }
                }
                Derived::SwapHalves(src) => {
                    let e = entry(&src)?.clone();
                    let t = self.get_raw(&src)?;
                    let rows = e.shape.first().copied().unwrap_or(0);
                    if rows % 2 != 0 {
                        bail!(
                            "'{}': tensor '{src}' has {rows} rows, not a shift and a scale half",
                            self.path.display()
                        );
                    }
                    let half = t.data.len() / 2;
                    let mut swapped = Vec::with_capacity(t.data.len());
                    swapped.extend_from_slice(&t.data[half..]);
                    swapped.extend_from_slice(&t.data[..half]);
                    view.overrides.insert(
                        name.clone(),
                        Tensor {
                            name: name.clone(),
                            data: Bytes::from(swapped),
                            ..t
                        },
                    );
                    e
                }
                Derived::Made(t) => {
                    let e = Entry {
                        file: 0,
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        start: 0,
                        end: 0,
                    };
                    view.overrides.insert(
                        name.clone(),
                        Tensor {
                            name: name.clone(),
                            ..t
                        },
                    );
                    e
                }
            };
            view.index.insert(name, e);
        }
        Ok(view)
    }

    /// Starts reading every tensor whose name starts with `prefix` into the page cache in the background (in file
    /// order), so that a later [`Checkpoint::get`] finds it there: exporters call it a few blocks ahead, which
    /// overlaps disk reads with their work. Nothing is mapped into the process by this.
    pub fn prefetch_prefix(&self, prefix: &str) {
        let mut ranges: Vec<(usize, usize, usize)> = self
            .index
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| (e.file, e.start, e.end))
            .collect();
        ranges.sort();
        // Merge neighbours into long sequential reads.
        let mut merged: Vec<(usize, usize, usize)> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(m) if m.0 == r.0 && r.1 <= m.2 + (1 << 20) => m.2 = m.2.max(r.2),
                _ => merged.push(r),
            }
        }
        let p = self
            .prefetcher
            .get_or_init(|| std::sync::Mutex::new(Prefetcher::start()));
        if let Ok(p) = p.lock() {
            for (f, a, b) in merged {
                let _ = p.tx.send((self.files[f].1.clone(), a, b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 and bf16 widen to the same f32 values through the parallel paths, at even and odd byte offsets, across
    /// several 64 Ki chunks.
    #[test]
    fn widens_half_floats_at_any_offset() {
        let vals: Vec<f32> = (0..150_001)
            .map(|i| ((i % 2001) as f32 - 1000.0) * 0.125)
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        for pad in [0usize, 1] {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("m.safetensors");
            // Written by hand: the safetensors crate orders tensors by alignment, which keeps 16-bit data even.
            let n = vals.len();
            let header = format!(
                r#"{{"pad":{{"dtype":"U8","shape":[{pad}],"data_offsets":[0,{pad}]}},"a":{{"dtype":"F16","shape":[{n}],"data_offsets":[{pad},{}]}},"b":{{"dtype":"BF16","shape":[{n}],"data_offsets":[{},{}]}}}}"#,
                pad + 2 * n,
                pad + 2 * n,
                pad + 4 * n
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend(std::iter::repeat_n(7u8, pad));
            bytes.extend(&f16);
            bytes.extend(&bf16);
            std::fs::write(&p, bytes).unwrap();
            let ck = Checkpoint::open(&p).unwrap();
            let round = |f: fn(f32) -> f32| vals.iter().map(|v| f(*v)).collect::<Vec<f32>>();
            let want_f16 = round(|v| half::f16::from_f32(v).to_f32());
            let want_bf16 = round(|v| half::bf16::from_f32(v).to_f32());
            assert!(
                ck.get("a").unwrap().to_f32().unwrap() == want_f16,
                "f16, pad {pad}"
            );
            assert!(
                ck.get("b").unwrap().to_f32().unwrap() == want_bf16,
                "bf16, pad {pad}"
            );
        }
    }

    #[test]
    fn reads_zero_copy_and_reports_missing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let vals: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &vals)
            .unwrap();
        safetensors::serialize_to_file([("a.weight", view)], None, &p).unwrap();
        let ck = Checkpoint::open(&p).unwrap();
        let t = ck.get("a.weight").unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.to_f32().unwrap(), vec![1.5, -2.0, 3.25, 0.0]);
        let e = ck.get("b.weight").unwrap_err().to_string();
        assert!(e.contains("no tensor 'b.weight'"), "{e}");
        let e = ck.get_shaped("a.weight", &[4]).unwrap_err().to_string();
        assert!(e.contains("expects [4]"), "{e}");
        let e = Checkpoint::open(d.path().join("none.safetensors").as_path())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot open"), "{e}");
        // A folder opens as shards.
        assert!(Checkpoint::open(d.path()).unwrap().contains("a.weight"));
    }

    /// A checkpoint too big for the page cache drops each released tensor's pages: tensors read again afterwards
    /// (by a second `get`, or while another `Bytes` of the same pages is alive) still read the right bytes.
    #[test]
    fn evicting_released_pages_keeps_values() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let big: Vec<u8> = (0..3 * 4096 * 4).map(|i| (i * 7 % 251) as u8).collect();
        let small: Vec<u8> = (0..64).map(|i| i as u8).collect();
        fn tv(b: &[u8], n: usize) -> safetensors::tensor::TensorView<'_> {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], b).unwrap()
        }
        safetensors::serialize_to_file(
            [("a", tv(&big, big.len() / 4)), ("b", tv(&small, 16))],
            None,
            &p,
        )
        .unwrap();
        let mut ck = Checkpoint::open(&p).unwrap();
        ck.files.clear();
        ck.index.clear();
        ck.add_file(&p, true).unwrap();
        for _ in 0..2 {
            let a = ck.get("a").unwrap();
            let a2 = ck.get("a").unwrap();
            drop(a);
            assert_eq!(&a2.data[..], &big[..]);
            drop(a2);
            assert_eq!(&ck.get("b").unwrap().data[..], &small[..]);
        }
    }
}
